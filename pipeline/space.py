"""The search's space: a Recipe (technique, its settings, fine-tuning epochs, format), what Optuna suggests
for one trial, and which recipes are the pipeline's menu variants."""

from __future__ import annotations

import dataclasses

from optimize.recipes import RECIPES
from runtime.errors import EdgeKitError, unknown
from runtime.vocabulary import QUANTIZATION_AWARE, VARIANTS

SEARCH_TECHNIQUES = ("none", "prune", "prune24", "cluster", "qat", "pqat", "cqat")  # none: the trained model
SEARCH_FORMATS = ("float16", "dynamic", "int8", "onnx-int8", "int8-mixed")


@dataclasses.dataclass(frozen=True)
class Recipe:
    technique: str
    epochs: int | None = None
    sparsity: float | None = None
    clusters: int | None = None
    init: str | None = None
    format: str = "int8"

    def slug(self) -> str:
        """The artifact's name after `<model>-`: every setting that changes the model."""
        name = {"none": "base", "prune24": "prune2of4"}.get(self.technique, self.technique)
        if self.sparsity is not None:
            name += f"{self.sparsity:.2f}"
        if self.clusters is not None:
            name += f"{self.clusters}{self.init}"
        return name + (f"-e{self.epochs}" if self.epochs else "")

    def menu_variant(self, finetune_epochs: int | None) -> str | None:
        """The pipeline's variant (pipeline.run.VARIANTS) that this recipe's model is, whatever the format: the
        same technique, settings and epochs (the pipeline's: --finetune-epochs, else the technique's default),
        from the same parent. None when it is no menu variant."""

        for variant in VARIANTS.values():
            settings = variant.settings
            technique = "prune24" if settings.get("structured") else variant.verb
            parent = VARIANTS.get(variant.parent)
            sparsity = (parent.settings if parent else settings).get("sparsity")
            clusters = (parent.settings if parent else settings).get("clusters")
            same = Recipe(technique, finetune_epochs or default_epochs(technique), sparsity, clusters,
                          "linear" if clusters else None, self.format)
            if same == self and (self.parent() is None or self.parent().menu_variant(finetune_epochs) == variant.parent):
                return variant.name
        return None

    def parent(self) -> Recipe | None:
        """pqat fine-tunes a pruned parent, cqat a clustered one (made with the same epochs)."""
        if self.technique == "pqat":
            return Recipe("prune", self.epochs, sparsity=self.sparsity)
        if self.technique == "cqat":
            return Recipe("cluster", self.epochs, clusters=self.clusters, init=self.init)
        return None

    def settings(self) -> dict:
        """The optimize verb and its settings."""
        verb = {"prune24": "prune", "none": None}.get(self.technique, self.technique)
        settings = {"epochs": self.epochs}
        if self.technique == "prune":
            settings["sparsity"] = self.sparsity
        elif self.technique == "prune24":
            settings["structured"] = "2:4"
        elif self.technique == "cluster":
            settings.update(clusters=self.clusters, init=self.init)
        return {"verb": verb, **settings}


def suggest(trial, max_epochs: int = 8, techniques: tuple[str, ...] = SEARCH_TECHNIQUES, fmt: str | None = None) -> Recipe:
    """The recipe space, define-by-run; fine-tuning epochs from 1 to `max_epochs`, among `techniques`; `fmt`: one
    format for every trial (micro, when the search minimizes the arena)."""
    technique = trial.suggest_categorical("technique", techniques)
    sparsity = clusters = init = epochs = None
    if technique in ("prune", "pqat"):
        sparsity = trial.suggest_float("sparsity", 0.3, 0.95, step=0.01)
    if technique in ("cluster", "cqat"):
        clusters = trial.suggest_int("clusters", 4, 64)
        init = trial.suggest_categorical("init", ("linear", "kmeans++", "density"))
    if technique != "none":
        epochs = trial.suggest_int("epochs", 1, max_epochs)
    fmt = fmt or ("int8" if technique in QUANTIZATION_AWARE else trial.suggest_categorical("format", SEARCH_FORMATS))
    return Recipe(technique, epochs, sparsity, clusters, init, fmt)


def default_epochs(technique: str) -> int:
    """The fine-tuning epochs the pipeline's menu uses for a technique (optimize.recipes' defaults)."""

    return RECIPES["prune" if technique == "prune24" else technique]().epochs


def parse_techniques(text: str | None) -> tuple[str, ...]:
    """--techniques: a comma-separated subset of SEARCH_TECHNIQUES, in their order."""

    if text is None:
        return SEARCH_TECHNIQUES
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in SEARCH_TECHNIQUES:
            raise unknown("technique", name, SEARCH_TECHNIQUES)
    if not names:
        raise EdgeKitError(f"--techniques names at least one of {', '.join(SEARCH_TECHNIQUES)}; got {text!r}.")
    return tuple(t for t in SEARCH_TECHNIQUES if t in names)

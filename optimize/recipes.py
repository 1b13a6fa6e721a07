"""Optimization recipes: typed, validated, JSON round-trippable settings.

One frozen dataclass per technique. The recipe that made an artifact is stored in
its manifest (`recipe`), and `recipe_from_dict` rebuilds it exactly.

    prune    magnitude pruning to `sparsity`, or `structured="2:4"` (2 zeros in every 4
             consecutive input-channel weights); polynomial-decay schedule, then stripped
    cluster  weight clustering to `clusters` shared values per kernel, then stripped
    qat      quantization-aware training (8-bit weights and activations)
    pqat     QAT that keeps a pruned parent's zeros (tfmot's prune-preserving scheme)
    cqat     QAT that keeps a clustered parent's shared values (cluster-preserving scheme)
"""

from __future__ import annotations

import dataclasses
import enum
import math

from runtime.errors import EdgeKitError, unknown
from runtime.vocabulary import TECHNIQUES


# optimize's techniques, named once in runtime.vocabulary.TECHNIQUES: Technique.PRUNE == "prune", ...
Technique = enum.Enum("Technique", {name.upper(): name for name in TECHNIQUES}, type=str)


class CentroidInit(str, enum.Enum):
    LINEAR = "linear"  # evenly spaced between min and max: keeps the rare large weights
    KMEANS_PLUS_PLUS = "kmeans++"
    DENSITY_BASED = "density"
    RANDOM = "random"


@dataclasses.dataclass(frozen=True)
class Recipe:
    epochs: int = 4  # fine-tuning epochs on the parent's training split
    lr: float = 1e-4  # Adam learning rate for fine-tuning
    batch_size: int = 32
    seed: int = 0
    exclude: tuple[str, ...] = ()  # layer names or fnmatch patterns left as they are

    technique = None  # set by each subclass

    def __post_init__(self):
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EdgeKitError(f"--{name.replace('_', '-')} must be a positive integer; got {value!r}.")
        if not (type(self.lr) in (int, float) and 0 < self.lr < 1 and math.isfinite(self.lr)):
            raise EdgeKitError(f"--lr must be between 0 and 1; got {self.lr!r}.")

    def to_dict(self) -> dict:
        return {"technique": self.technique.value, **dataclasses.asdict(self),
                "exclude": list(self.exclude)}


DEFAULT_SPARSITY = 0.8
MAX_CLUSTERS = 256  # an int8 kernel holds at most 256 values; tfmot's memory grows with weights x clusters


@dataclasses.dataclass(frozen=True)
class PruneRecipe(Recipe):
    sparsity: float | None = None  # fraction of each pruned kernel set to zero (unstructured); default 0.8
    structured: str | None = None  # "M:N": M zeros in every N consecutive input-channel weights
    epochs: int = 8
    lr: float = 3e-4
    technique = Technique.PRUNE

    def __post_init__(self):
        super().__post_init__()
        if self.structured is not None:
            self.m_by_n  # validates
            if self.sparsity is not None:
                raise EdgeKitError(f"--structured {self.structured} sets the sparsity itself "
                                   f"({self.m_by_n[0]}/{self.m_by_n[1]}); got --sparsity {self.sparsity} as well. "
                                   "Give one of them.")
            return
        if self.sparsity is None:
            object.__setattr__(self, "sparsity", DEFAULT_SPARSITY)
        if not (type(self.sparsity) in (int, float) and 0 < self.sparsity < 1):
            raise EdgeKitError(f"--sparsity must be strictly between 0 and 1 (e.g. 0.8); got {self.sparsity!r}.")

    @property
    def m_by_n(self) -> tuple[int, int] | None:
        if self.structured is None:
            return None
        m, sep, n = str(self.structured).partition(":")
        if not (sep and m.isdigit() and n.isdigit() and 0 < int(m) < int(n)):
            raise EdgeKitError(f"--structured must be M:N with 0 < M < N (e.g. 2:4); got {self.structured!r}.")
        return int(m), int(n)

    @property
    def target_sparsity(self) -> float:
        return self.m_by_n[0] / self.m_by_n[1] if self.structured else self.sparsity


@dataclasses.dataclass(frozen=True)
class ClusterRecipe(Recipe):
    clusters: int = 16  # shared values per kernel
    init: CentroidInit = CentroidInit.LINEAR
    epochs: int = 4
    lr: float = 3e-5
    technique = Technique.CLUSTER

    def __post_init__(self):
        super().__post_init__()
        if type(self.clusters) is not int or not 2 <= self.clusters <= MAX_CLUSTERS:
            raise EdgeKitError(f"--clusters must be a whole number from 2 to {MAX_CLUSTERS} (an int8 kernel holds at "
                               f"most {MAX_CLUSTERS} values); got {self.clusters!r}.")
        try:
            object.__setattr__(self, "init", CentroidInit(self.init))
        except ValueError:
            raise unknown("centroid init", str(self.init), [c.value for c in CentroidInit]) from None

    def to_dict(self) -> dict:
        return {**super().to_dict(), "init": self.init.value}


@dataclasses.dataclass(frozen=True)
class QATRecipe(Recipe):
    epochs: int = 3
    technique = Technique.QAT


@dataclasses.dataclass(frozen=True)
class PQATRecipe(Recipe):
    epochs: int = 3
    technique = Technique.PQAT


@dataclasses.dataclass(frozen=True)
class CQATRecipe(Recipe):
    epochs: int = 3
    preserve_sparsity: bool | None = None  # also keep zeros; None: when the parent has them (pruned, then clustered)
    technique = Technique.CQAT


RECIPES = {cls.technique.value: cls for cls in (PruneRecipe, ClusterRecipe, QATRecipe, PQATRecipe, CQATRecipe)}


def recipe_from_dict(data: dict) -> Recipe:
    """Rebuild a recipe from its `to_dict()` form (as stored in a manifest)."""
    data = dict(data)
    technique = data.pop("technique", None)
    if technique not in RECIPES:
        raise unknown("technique", str(technique), RECIPES)
    cls = RECIPES[technique]
    fields = {f.name for f in dataclasses.fields(cls)}
    extra = set(data) - fields
    if extra:
        raise EdgeKitError(f"recipe for {technique} has unknown settings {sorted(extra)}; it takes {sorted(fields)}.")
    return cls(**data)

"""Applying tfmot techniques to a tf_keras model, layer by layer.

Each `prepare_*` returns a `Prepared`: the wrapped model to fine-tune, the callbacks
its training needs, and how to strip it afterwards. Wrapping is done the tfmot way:
`clone_model` with a clone function that wraps only the layers the technique supports
(and the user did not exclude); every other layer is recorded in `skipped` with the
reason, and left as it is.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable

from optimize.measure import KERNEL_NAMES, short_name, effective_kernels
from optimize.recipes import ClusterRecipe, CQATRecipe, PQATRecipe, PruneRecipe, QATRecipe, Recipe
from runtime.errors import ArtifactError, EdgeKitError
from train.backend import keras

import tensorflow_model_optimization as tfmot  # noqa: E402  (after train.backend: Keras 2)
from tensorflow_model_optimization.python.core.clustering.keras.clustering_registry import ClusteringRegistry
from tensorflow_model_optimization.python.core.sparsity.keras.prune_registry import PruneRegistry

CENTROID_INIT = {
    "linear": tfmot.clustering.keras.CentroidInitialization.LINEAR,
    "kmeans++": tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS,
    "density": tfmot.clustering.keras.CentroidInitialization.DENSITY_BASED,
    "random": tfmot.clustering.keras.CentroidInitialization.RANDOM,
}


@dataclasses.dataclass
class Prepared:
    model: object  # the wrapped keras.Model to fine-tune
    strip: Callable  # wrapped model -> deployable model
    touched: list[str]  # layers the technique wraps
    skipped: dict[str, str]  # layer -> why it was left alone
    callbacks: list = dataclasses.field(default_factory=list)
    details: dict = dataclasses.field(default_factory=dict)  # e.g. the pruning schedule


def _has_kernel(layer) -> bool:
    return any(getattr(layer, attr, None) is not None for attr in ("kernel", "depthwise_kernel"))


def is_excluded(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _clone_wrapping(model, recipe: Recipe, decide: Callable, wrap: Callable, kernels_only: bool = True):
    """clone_model, wrapping the layers `decide(layer)` accepts (it returns None or a skip reason).

    Pruning and clustering work on kernels, so only layers with one are considered;
    quantization must annotate every layer (BN, activations, pooling too), or the
    graph stays float between them and the converter cannot make it integer.
    """
    touched, skipped = [], {}

    def clone_function(layer):
        if isinstance(layer, keras.layers.InputLayer):
            return layer.__class__.from_config(layer.get_config())
        if kernels_only and not _has_kernel(layer):
            return layer
        if is_excluded(layer.name, recipe.exclude):
            skipped[layer.name] = "excluded by --exclude"
            return layer
        reason = decide(layer)
        if reason:
            skipped[layer.name] = reason
            return layer
        touched.append(layer.name)
        return wrap(layer)

    try:
        clone = keras.models.clone_model(model, clone_function=clone_function)
    except ValueError as exc:  # tfmot names the layer it cannot wrap
        raise EdgeKitError(f"tfmot cannot apply {recipe.technique.value} to this model: {exc}") from None
    if not touched:
        raise EdgeKitError(
            f"{recipe.technique.value} found no layer to work on (skipped: {skipped or 'no layer has a kernel'}); "
            "expected at least one Conv2D or Dense layer it supports. Check --exclude."
        )
    return clone, touched, skipped


def prepare_prune(model, recipe: PruneRecipe, steps_per_epoch: int) -> Prepared:
    sparsity = tfmot.sparsity.keras
    total_steps = steps_per_epoch * recipe.epochs
    details = {}
    if recipe.structured:
        m, n = recipe.m_by_n
        schedule = sparsity.ConstantSparsity(m / n, begin_step=0)  # tfmot sets M:N masks at step 1
        details = {"pattern": f"{m}:{n}", "axis": "input channels (TFLite layout)"}

        def decide(layer):
            if type(layer) not in (keras.layers.Conv2D, keras.layers.Dense):
                return f"{m}:{n} applies to Conv2D and Dense kernels only"
            channels_in = layer.kernel.shape[-2] if layer.kernel.shape.rank == 4 else layer.kernel.shape[0]
            if channels_in % n:
                return f"{channels_in} input channels is not a multiple of {n}"
            return None
    else:
        if total_steps < 2:
            raise EdgeKitError(f"pruning needs at least 2 training steps; got {total_steps}. Raise --epochs.")
        # Reach the target two thirds of the way through, then fine-tune at full sparsity.
        frequency = max(1, steps_per_epoch // 4)
        end_step = max(frequency, (total_steps * 2 // 3) // frequency * frequency)
        schedule = sparsity.PolynomialDecay(0.0, recipe.sparsity, begin_step=0, end_step=end_step,
                                            frequency=frequency)
        details = {"schedule": "polynomial_decay", "begin_step": 0, "end_step": end_step,
                   "frequency": frequency, "total_steps": total_steps}

        def decide(layer):
            if not PruneRegistry.supports(layer):
                return "not supported by tfmot pruning"
            if not PruneRegistry._LAYERS_WEIGHTS_MAP.get(type(layer)):
                return "tfmot prunes no weight of this layer type"  # e.g. DepthwiseConv2D
            return None

    def wrap(layer):
        return sparsity.prune_low_magnitude(layer, pruning_schedule=schedule, sparsity_m_by_n=recipe.m_by_n)

    clone, touched, skipped = _clone_wrapping(model, recipe, decide, wrap)
    return Prepared(clone, sparsity.strip_pruning, touched, skipped,
                    callbacks=[sparsity.UpdatePruningStep()], details=details)


def prepare_cluster(model, recipe: ClusterRecipe, steps_per_epoch: int) -> Prepared:
    clustering = tfmot.clustering.keras

    def decide(layer):
        if not ClusteringRegistry.supports(layer):
            return "not supported by tfmot clustering"
        if not ClusteringRegistry._LAYERS_WEIGHTS_MAP.get(type(layer)):
            return "tfmot clusters no weight of this layer type"
        kernel = getattr(layer, "kernel")
        if kernel.shape.num_elements() < recipe.clusters:
            return f"{kernel.shape.num_elements()} weights, fewer than {recipe.clusters} clusters"
        return None

    def wrap(layer):
        return clustering.cluster_weights(layer, number_of_clusters=recipe.clusters,
                                          cluster_centroids_init=CENTROID_INIT[recipe.init.value])

    clone, touched, skipped = _clone_wrapping(model, recipe, decide, wrap)
    return Prepared(clone, clustering.strip_clustering, touched, skipped,
                    details={"clusters": recipe.clusters, "init": recipe.init.value})


def _scheme(recipe):
    quant = tfmot.quantization.keras
    if isinstance(recipe, PQATRecipe):
        return _QuantizingOnly(quant.collab_opts.Default8BitPrunePreserveQuantizeScheme())
    if isinstance(recipe, CQATRecipe):
        return _QuantizingOnly(tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme(
            recipe.preserve_sparsity))
    return quant.default_8bit.Default8BitQuantizeScheme()


class _QuantizingOnly(tfmot.quantization.keras.QuantizeScheme):
    """A PQAT or CQAT scheme whose registry supports only the layers the 8-bit scheme quantizes.

    Their registries call every layer without trainable weights supported (they answer whether sparsity or
    clusters are kept, not whether the layer quantizes), then ask the 8-bit registry for its config: a
    Rescaling or TFOpLambda before an annotated layer (MobileNetV3's input and hard-swish) makes
    quantize_apply fail where QAT goes through.
    """

    def __init__(self, scheme):
        self.scheme = scheme

    def get_layout_transformer(self):
        return self.scheme.get_layout_transformer()

    def get_quantize_registry(self):
        registry = self.scheme.get_quantize_registry()
        default = tfmot.quantization.keras.default_8bit.Default8BitQuantizeScheme().get_quantize_registry()
        own = registry.supports
        registry.supports = lambda layer: own(layer) and default.supports(layer)  # shadows the classmethod
        return registry


def _producers(layer) -> list:
    """The layers whose outputs `layer` takes (in the model being cloned)."""
    nodes = getattr(layer, "_inbound_nodes", [])
    if not nodes:
        return []
    inbound = nodes[0].inbound_layers
    return list(inbound) if isinstance(inbound, (list, tuple)) else [inbound]


def prepare_qat(model, recipe: QATRecipe | PQATRecipe | CQATRecipe, steps_per_epoch: int) -> Prepared:
    """QAT and its collaborative forms: annotate the model as tfmot's quantize_model does, then quantize_apply.

    Every layer the scheme supports is annotated, and so is every BatchNormalization that follows an
    annotated layer: tfmot's layout transforms then fold it into its convolution (Conv-BN-ReLU becomes one
    quantized op), so the int8 file has no float island between them. A layer named by --exclude stays
    float, and so does a BatchNormalization after it: that layer alone is float.
    """
    quant = tfmot.quantization.keras
    scheme = _scheme(recipe)
    registry = scheme.get_quantize_registry()
    annotated = set()

    def decide(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            producers = _producers(layer)
            if producers and all(p.name in annotated for p in producers):
                return None
            return "BatchNormalization after a layer that stays float"
        return None if registry.supports(layer) else "not supported by tfmot's 8-bit quantization"

    def annotate(layer):
        annotated.add(layer.name)
        return quant.quantize_annotate_layer(layer)

    wrapped, touched, skipped = _clone_wrapping(model, recipe, decide, annotate, kernels_only=False)
    try:
        with quant.quantize_scope():
            quantized = quant.quantize_apply(wrapped, scheme)
    except (ValueError, RuntimeError, TypeError, AttributeError) as exc:  # tfmot's own failures on a graph
        raise EdgeKitError(f"tfmot cannot apply {recipe.technique.value} to this model: {exc}") from None
    return Prepared(quantized, lambda m: m, touched, skipped,
                    details={"scheme": type(getattr(scheme, "scheme", scheme)).__name__, "weights": "int8 per-channel",
                             "activations": "int8 per-tensor", "batchnorm": "folded into its convolution"})


def float_twin(quantized, base):
    """`base` (the float model QAT was applied to) holding the weights QAT trained in `quantized`.

    Each kernel is the one the layer's weight quantizer feeds to the forward pass (per-channel int8 values
    times their scales, masked or clustered by PQAT and CQAT: the values the int8 file holds), every other
    weight (biases, BatchNormalization's) as trained; layers and weights are matched by name.
    """

    kernels = effective_kernels(quantized)
    trained = {}  # layer name -> {weight name: value}; a QuantizeWrapper holds its layer's kernel itself
    for layer in quantized.layers:
        name = getattr(layer, "layer", layer).name
        trained[name] = {short_name(w.name): w for w in layer.weights if w.name.startswith(name + "/")}
    twin = keras.models.clone_model(base)
    for layer in twin.layers:
        if not layer.weights:
            continue
        own = trained.get(layer.name, {})
        names = [short_name(w.name) for w in layer.weights]
        if any(n not in own for n in names):
            raise ArtifactError(f"the quantization-aware model has no weight {layer.name}/"
                                f"{next(n for n in names if n not in own)}; run the optimize step again.")
        layer.set_weights([kernels[layer.name][1] if n in KERNEL_NAMES and layer.name in kernels
                           else own[n].numpy() for n in names])
    return twin


PREPARE = {"prune": prepare_prune, "cluster": prepare_cluster, "qat": prepare_qat, "pqat": prepare_qat,
           "cqat": prepare_qat}


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, math.ceil(n_train / batch_size))

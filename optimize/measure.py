"""Measured facts about a model's kernels: zeros, unique values, the M:N pattern, gzip size.

Facts are counted in the weights, never taken from a schedule's promise. For a
quantization-aware model the kernel measured is the one its weight quantizer feeds
to the layer (what the int8 export will hold): tfmot's prune- and cluster-preserving
quantizers mask or re-cluster the float kernel there.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

KERNEL_NAMES = ("kernel", "depthwise_kernel")


def short_name(variable_name: str) -> str:
    return variable_name.split("/")[-1].split(":")[0]


def effective_kernels(model) -> dict[str, tuple[str, np.ndarray, bool]]:
    """{layer: (layer type, kernel as the forward pass uses it, quantized?)} for layers with a kernel.

    For quantization-aware layers that is the fake-quantized kernel: per-channel int8
    values times each output channel's scale.
    """
    kernels = {}
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)  # unwrap pruning/clustering/quantization wrappers
        weight_vars = getattr(layer, "_weight_vars", None)  # QuantizeWrapperV2: (weight, quantizer, vars)
        if weight_vars:
            for weight, quantizer, quantizer_vars in weight_vars:
                if short_name(weight.name) in KERNEL_NAMES:
                    value = quantizer(weight, training=False, weights=quantizer_vars)
                    kernels[inner.name] = (type(inner).__name__, np.asarray(value), True)
            continue
        for attr in KERNEL_NAMES:
            weight = getattr(inner, attr, None)
            if weight is not None and hasattr(weight, "numpy"):
                kernels[inner.name] = (type(inner).__name__, weight.numpy(), False)
    return kernels


def kernel_facts(model, touched: list[str] | None = None) -> dict:
    """Per-layer weights, zeros, sparsity and unique values; overall figures over `touched` layers.

    `unique` counts distinct values in the whole kernel for float kernels (clustering shares
    values across it) and per output channel for quantized ones (each channel has its own
    int8 scale, so the same cluster index maps to a different float per channel).
    """
    per_layer = {}
    for name, (kind, kernel, quantized) in effective_kernels(model).items():
        zeros = int(np.count_nonzero(kernel == 0))
        per_channel = max(np.unique(kernel[..., c]).size for c in range(kernel.shape[-1]))
        per_layer[name] = {"type": kind, "weights": int(kernel.size), "zeros": zeros,
                           "sparsity": zeros / kernel.size, "quantized": quantized,
                           "unique": int(per_channel if quantized else np.unique(kernel).size),
                           "unique_per_channel": int(per_channel)}

    def overall(names):
        total = sum(per_layer[n]["weights"] for n in names)
        return sum(per_layer[n]["zeros"] for n in names) / total if total else 0.0

    touched = [n for n in (touched if touched is not None else per_layer) if n in per_layer]
    return {
        "layers": per_layer,
        "sparsity": overall(touched),  # over the kernels the technique worked on
        "model_sparsity": overall(list(per_layer)),  # over every kernel
        "max_unique": max((per_layer[n]["unique"] for n in touched), default=0),
    }


def input_channel_rows(kernel: np.ndarray) -> np.ndarray:
    """Kernel as rows along its input-channel axis, TFLite layout: (Cout*H*W, Cin) or (Cout, Cin)."""
    if kernel.ndim == 4:  # Conv2D (H, W, Cin, Cout) -> (Cout, H, W, Cin)
        return kernel.transpose(3, 0, 1, 2).reshape(-1, kernel.shape[2])
    if kernel.ndim == 2:  # Dense (Cin, Cout) -> (Cout, Cin)
        return kernel.T
    raise ValueError(f"expected a rank-2 or rank-4 kernel; got shape {kernel.shape}")


def satisfies_m_by_n(kernel: np.ndarray, m: int, n: int) -> bool:
    """True if every n consecutive input-channel weights hold at least m zeros."""
    rows = input_channel_rows(kernel)
    pad = (-rows.shape[1]) % n
    blocks = np.pad(rows, ((0, 0), (0, pad))).reshape(-1, n)
    return bool(np.all(np.count_nonzero(blocks == 0, axis=1) >= m))


def gzip_bytes(path: str | Path) -> int:
    """Size of the file after gzip -9: what pruning and clustering buy on the wire."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=9))

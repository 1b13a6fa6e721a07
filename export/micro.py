"""The `micro` format: the int8 file checked for TensorFlow Lite Micro and verified in TFLM's interpreter.

What `check` does to a converted file, before it is written (runtime/backends/tflm.py does the TFLM work):
1. every operator has a TFLM kernel, and input and output are int8 (one line naming each missing operator);
2. the tensor arena TFLM allocates is measured (its RecordingMicroAllocator) and, with the flash (the file's bytes),
   held to --max-ram and --max-flash: over either, nothing is written (exit 1, one line);
3. TFLM runs the whole test split one image at a time, and LiteRT's reference kernels (BUILTIN_REF) run the same
   int8 inputs: the outputs are compared value by value and recorded; an image whose outputs differ is run again
   in both keeping every tensor, and the first operator whose output differs is recorded, with whether the
   difference is FULLY_CONNECTED's rounding alone (export.tflm_rounding.ROUNDING: recomputed exactly, the two
   roundings give the two outputs). More than MAX_LSB apart fails, unless every differing image is examined and
   each first differs by that rounding alone: in a deeper model (ResNet-8 ending in SOFTMAX) one step at a
   FULLY_CONNECTED travels through the later layers and softmax stretches it, which is still only that rounding
   (the sidecar's `reference.grown_from_rounding`);
4. TFLM's outputs go through the one verification rule (accuracy budget and agreement against Keras), and the C
   sources are made: model.micro.cc (the array) and model.micro.h (the model's contract: export/firmware.py).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from export import firmware
from export.tflm_rounding import ROUNDING, first_differences, reference_outputs
from runtime.backends import tflm
from runtime.errors import ConversionError, VerificationError
from runtime.limits import size_text

# TFLM and LiteRT's reference kernels implement the same integer arithmetic but for FULLY_CONNECTED's rounding,
# which parts them by one step of the output's quantization on a few values in a thousand. More than one step would
# be a different computation.
MAX_LSB = 1
EXAMINED = 64  # differing images run again tensor by tensor (two interpreters, each keeping every tensor)


def check(path, data: bytes, model, x_test, budgets: dict, preprocessing, labels: list[str],
          output_kind: str) -> tuple[np.ndarray, dict, dict]:
    """(TFLM's outputs as float, the sidecar's `micro` record, {file name: C source}) of a micro file; the header
    carries the model's contract (`preprocessing`, `labels`, `output_kind`: export/firmware.py)."""

    ops = tflm.operators(data)
    missing = tflm.unsupported(ops)
    if missing:
        raise ConversionError(f"the int8 file uses {', '.join(missing)}, which TensorFlow Lite Micro has no kernel "
                              "for; change those layers (e.g. a ReLU for a GELU) or ship the int8 file to a CPU.")
    if (model.input.dtype, model.output.dtype) != ("int8", "int8"):
        raise ConversionError(f"a micro file takes int8 input and gives int8 output; the converter wrote "
                              f"{model.input.dtype} and {model.output.dtype}.")
    arena, flash = tflm.arena_bytes(path), len(data)
    over = [f"{what} of {size_text(value)} against --max-{flag} {size_text(limit)}"
            for what, flag, value, limit in (("a tensor arena (RAM)", "ram", arena, budgets.get("ram")),
                                             ("flash", "flash", flash, budgets.get("flash")))
            if limit is not None and value > limit]
    if over:
        raise VerificationError(f"the model needs {' and '.join(over)}; nothing was written. Choose a smaller model "
                                "or a larger budget.")
    fed = model.input_tensors(x_test)  # an NHWC file: the tensor TFLM takes, as EdgeKit's runtime feeds it
    raw, ref = tflm.outputs(path, fed), reference_outputs(path, fed)
    diff = np.abs(raw.astype(np.int32) - ref.astype(np.int32))
    differing = np.flatnonzero(diff.any(axis=1)) if diff.size else np.empty(0, int)
    firsts = first_differences(path, fed[differing[:EXAMINED]]) if len(differing) else []
    record = {"arena_bytes": arena, "flash_bytes": flash, "operators": ops, "macs": tflm.macs(data),
              "interpreter": f"tflite-micro {tflm.version()}",
              "reference": {"kernels": "LiteRT BUILTIN_REF", "images": int(len(raw)),
                            "bit_equal_images": int((diff == 0).all(axis=1).sum()),
                            "equal_values": int((diff == 0).sum()), "values": int(diff.size),
                            "max_lsb": int(diff.max()) if diff.size else 0,
                            **({"differing": _differing(firsts, len(differing))} if len(differing) else {})}}
    if diff.size and diff.max() > MAX_LSB and len(differing) > len(firsts):  # every one examined, before judging
        firsts = first_differences(path, fed[differing])
        record["reference"]["differing"] = _differing(firsts, len(differing))
    proven = bool(firsts) and len(firsts) == len(differing) and all(first.get("rounding") for first in firsts)
    if diff.size and diff.max() > MAX_LSB and proven:
        record["reference"]["grown_from_rounding"] = True  # several steps at the output, one rounding at the start
    if diff.size and diff.max() > MAX_LSB and not proven:
        where = sorted({first["operator"] for first in firsts if first})
        raise VerificationError(f"TFLM's outputs differ from LiteRT's reference kernels by up to {int(diff.max())} "
                                f"steps (on {len(differing)} of {len(raw)} images, first in "
                                f"{', '.join(where) or 'the output'}); at most {MAX_LSB} is rounding, more is a "
                                "different computation.")
    constants = firmware.contract(model, preprocessing, labels, output_kind, "g_model")
    cc, h = firmware.c_sources(data, ops, arena, constants)
    return model.output_values(raw), record, {"model.micro.cc": cc, "model.micro.h": h}


def _differing(firsts: list[dict], images: int) -> dict:
    """The record of the images whose outputs differ: how many, how many were run again tensor by tensor, the
    operator each first differs in, and how many of those differences are FULLY_CONNECTED's rounding alone."""

    return {"images": images, "examined": len(firsts),
            "first_operator": dict(Counter(first.get("operator", "none") for first in firsts)),
            "rounding_alone": sum(bool(first.get("rounding")) for first in firsts), "why": ROUNDING}

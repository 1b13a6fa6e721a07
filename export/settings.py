"""An export's settings: what `export()` takes besides the source and the formats, checked before TensorFlow
loads or anything is read."""

from __future__ import annotations

import dataclasses

from runtime.errors import EdgeKitError
from runtime.vocabulary import (MAX_ACCURACY_DROP, MIXED_OF, FileFormat, check_max_accuracy_drop, check_options,
                                get_format)

DEFAULT_CALIBRATION_SAMPLES = 300
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
OPSETS = range(13, 19)  # per-channel QDQ needs 13; tf2onnx 1.17 writes up to 18


@dataclasses.dataclass(frozen=True)
class Settings:
    """One export run's settings (export()'s keyword arguments, checked by check_settings)."""

    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES
    opset: int | None = None
    calibration_method: str | None = None
    max_accuracy_drop: float = MAX_ACCURACY_DROP
    keep_float: list[str] | str | None = None
    explain: bool = False
    sparse: bool = False
    max_ram: int | None = None
    max_flash: int | None = None
    trust: bool = False
    allow_untrained: bool = False
    ticking: bool = True  # a live line for a long step (off when progress goes nowhere)

    @property
    def budgets(self) -> dict:
        """A microcontroller file's budgets: its tensor arena (ram) and its bytes (flash)."""
        return {"ram": self.max_ram, "flash": self.max_flash}

    @property
    def method(self) -> str:
        return self.calibration_method or "minmax"


def check_settings(formats, *, calibration_samples=DEFAULT_CALIBRATION_SAMPLES, opset=None,
                   calibration_method=None, max_accuracy_drop=MAX_ACCURACY_DROP, keep_float=None,
                   explain=False) -> list[FileFormat]:
    """Every option checked against what is possible, before TensorFlow loads or anything is read."""
    fmts = [get_format(key) for key in formats]
    if not fmts:
        raise EdgeKitError("nothing to export; name at least one format.")
    keys = {f.key for f in fmts}
    selective = keys & {*MIXED_OF, *MIXED_OF.values()}
    if keep_float is not None:
        if keep_float != "auto" and not (isinstance(keep_float, list) and keep_float
                                         and all(isinstance(n, str) and n for n in keep_float)):
            raise EdgeKitError(f"--keep-float takes Keras layer names separated by commas, or auto; got {keep_float!r}.")
        if not selective:
            raise EdgeKitError("--keep-float applies to int8 (`--tflite --quantize int8` or `--onnx --quantize int8`); "
                               "no int8 format was asked for.")
    for mixed in keys & set(MIXED_OF.values()):
        if keep_float is None:
            raise EdgeKitError(f"{mixed} needs --keep-float LAYER[,LAYER...] or --keep-float auto.")
    if explain and not selective:
        raise EdgeKitError("--explain ranks the layers int8 hurts; ask for it with `--tflite --quantize int8` or "
                           "`--onnx --quantize int8`.")
    for fmt in fmts:
        check_options(fmt, {"opset": opset, "calibration_method": calibration_method})
    if calibration_method is not None and calibration_method not in CALIBRATION_METHODS:
        raise EdgeKitError(f"--calibration-method must be one of {', '.join(CALIBRATION_METHODS)}; "
                           f"got '{calibration_method}'.")
    if type(calibration_samples) is not int or calibration_samples < 1:
        raise EdgeKitError(f"--calibration-samples must be a positive integer; got {calibration_samples!r}.")
    check_max_accuracy_drop(max_accuracy_drop)
    if opset is not None and (type(opset) is not int or opset not in OPSETS):
        raise EdgeKitError(f"--opset must be {OPSETS.start}..{OPSETS.stop - 1} (per-channel int8 needs 13; tf2onnx "
                           f"writes up to {OPSETS.stop - 1}); got {opset!r}.")
    return fmts

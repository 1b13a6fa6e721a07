"""A PyTorch model saved with `torch.export.save` (a .pt2 file: the ExportedProgram archive PyTorch 2 documents) as
a source of export: read without running pickled code, run by torch on the test split as the reference every
file is verified against, and converted by litert-torch (Google's PyTorch-to-LiteRT converter) to TFLite and by
torch.onnx.export to ONNX (the `torch` extra, imported lazily).

    python -m export --tflite --quantize int8 --micro model.pt2 --dataset digits --mean 127.5 --std 127.5
    python -m export --all --layout nchw model.pt2 --dataset digits --mean 127.5 --std 127.5

Formats: `float32` (litert-torch's float file), `int8` (PT2E static quantization: per-channel symmetric int8
weights, int8 activations, int8 input and output, calibrated on the dataset's training split, the same images in
the same order as every EdgeKit int8 file, one image per run since the program's batch is 1), `micro` (that
fully integer file checked and verified for TensorFlow Lite Micro as every micro file, its C sources written),
`dynamic` and `float16` (the float file through ai-edge-quantizer's recipes, export/edge_quantizer.py), and
`onnx-float32` (torch.onnx.export's dynamo exporter, batch 1 as the program) and `onnx-int8` (onnxruntime's
static int8 of it, as every ONNX file). The files take NHWC input (litert-torch's `to_channel_last_io` around
the channels-first program), as every EdgeKit file does, or with --layout nchw the program's own (1, C, H, W);
the sidecar says which and names the program's own layout.

Loading: `torch.export.load` unpickles an archive's weights, constants and sample inputs, and falls back to
full pickle (code) where the safe unpickler refuses (torch/_export/serde/serialize.py, `weights_only=False`),
loads TorchScript custom objects and opaque Python objects by pickle. Unless --trust-model, EdgeKit reads the
archive first (bounded: its members, their sizes), refuses custom and opaque objects, and runs the load with
every `torch.load` held to `weights_only=True`: a file that needs more is refused in one line (exit 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import io
import json
import logging
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from export import edge_quantizer
from runtime.artifacts.preprocessing import Preprocessing
from runtime.datasets import dataset_for_model
from runtime.errors import ArtifactError, ConversionError, EdgeKitError, UntrustedModel
from runtime.fsutil import check_readable_file
from runtime.text import terminal

SUFFIX = ".pt2"
EXTRA = ("pip install 'edgekit-ml[torch]' after PyTorch's CPU wheel (pip install torch==2.13.0 --index-url "
         "https://download.pytorch.org/whl/cpu; README, Models from PyTorch)")
MAX_BYTES = 2 << 30  # a .pt2 file; an image classifier for a device is far smaller
MAX_MEMBERS = 10_000
MAX_CONFIG_BYTES = 64 << 20  # one JSON member read to check it
CODE_PREFIXES = ("custom_obj_", "opaque_obj_")  # constants torch loads as TorchScript objects or by pickle
RECIPE = "PT2E static int8: per-channel symmetric weights, int8 activations (litert-torch's PT2EQuantizer)"


def is_pt2(path: Path) -> bool:
    return path.suffix.lower() == SUFFIX and not path.is_dir()


def _modules():
    try:
        with _quiet():  # start-up and deprecation chatter: torchao's kernels for GPUs, torch's pytree notes
            import litert_torch
            import torch
    except ImportError as exc:
        raise EdgeKitError(f"a .pt2 source needs PyTorch and litert-torch ({exc.name} is not installed): "
                           f"{EXTRA}.") from None
    return torch, litert_torch


def check_archive(path: Path, data: bytes) -> None:
    """Refuse what torch.export.load would run code for, before it reads anything: an archive that is not a
    torch.export one, too many members or bytes, TorchScript custom objects or opaque Python objects among its
    constants (the pickled tensors themselves are loaded with the safe unpickler, see `_safe_torch_load`)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError) as exc:
        raise ArtifactError(f"{path.name} is not a torch.export archive (a .pt2 zip file): {terminal(exc)}.") from None
    if len(members) > MAX_MEMBERS or sum(m.file_size for m in members) > MAX_BYTES:
        raise ArtifactError(f"{path.name} holds {len(members):,} members, "
                            f"{sum(m.file_size for m in members):,} bytes unpacked; expected an image classifier's "
                            f"program (at most {MAX_MEMBERS:,} members, {MAX_BYTES >> 30} GiB).")
    names = [m.filename for m in members]
    models = [n for n in names if n.split("/", 1)[-1] == "models/model.json"]
    if not models:
        raise ArtifactError(f"{path.name} has no models/model.json: it is not an archive torch.export.save wrote "
                            "(a torch.save checkpoint or a TorchScript file is code to load; export the module with "
                            "torch.export.export and save it with torch.export.save).")
    for member in members:
        rel = member.filename.split("/", 1)[-1]
        if not rel.startswith("data/") or not rel.endswith("_config.json"):
            continue
        if member.file_size > MAX_CONFIG_BYTES:
            raise ArtifactError(f"{path.name}: {terminal(member.filename[:200])} is {member.file_size:,} bytes; expected "
                                "a config.")
        try:
            config = json.loads(archive.read(member)).get("config", {})
            entries = [(name, entry.get("path_name", "")) for name, entry in config.items()]
        except (ValueError, AttributeError, TypeError) as exc:
            raise ArtifactError(f"{path.name}: {terminal(member.filename[:200])} is not torch.export's config "
                                f"({terminal(str(exc)[:200])}).") from None
        code = [name for name, file in entries if str(file).startswith(CODE_PREFIXES)]
        if code:
            raise UntrustedModel(f"{path.name} holds objects torch loads by running code "
                                 f"({terminal(', '.join(str(c)[:60] for c in code[:3]))}: "
                                 "TorchScript or pickled Python objects); export a module whose state is tensors, "
                                 "or pass --trust-model if you trust where it came from.")


@contextlib.contextmanager
def _safe_torch_load(torch, refused: list):
    """Every torch.load inside holds to weights_only=True (tensors and plain containers; never code), whatever its
    caller asks: torch.export.load's fallback to full pickle raises instead. `refused` gets what was refused."""
    real = torch.load

    def safe(f, *args, weights_only=None, **kwargs):
        del weights_only
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its notes on pickle protocols
                return real(f, *args, weights_only=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- the unpickler's refusal, whatever its type
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            after = next((i + 1 for i, line in enumerate(lines) if line.endswith("WeightsUnpickler error:")), None)
            refused.append((lines[after] if after is not None and after < len(lines) else type(exc).__name__)[:200])
            raise
    torch.load = safe
    try:
        yield
    finally:
        torch.load = real


def load_program(path: Path, trust: bool):
    """The ExportedProgram in `path`, loaded as data unless `trust` (see the module docstring). The archive is
    checked before torch is imported (seconds): a file refused is refused at once."""
    info = check_readable_file(path, "model file")
    if info.st_size > MAX_BYTES:
        raise ArtifactError(f"{path.name} is {info.st_size:,} bytes; expected at most {MAX_BYTES >> 30} GiB.")
    data = path.read_bytes()  # read once: what is checked is what is loaded
    if not trust:
        check_archive(path, data)
    torch, _ = _modules()
    refused: list[str] = []
    try:
        with contextlib.nullcontext() if trust else _safe_torch_load(torch, refused):
            return torch.export.load(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 -- torch raises assorted types for a file it cannot read
        if refused:
            raise UntrustedModel(f"{path.name} holds pickled data that is not plain tensors ({terminal(refused[0])}); "
                                 "loading it "
                                 "would run code. Pass --trust-model if you trust where it came from.") from exc
        raise ArtifactError(f"{path.name} could not be loaded by torch.export.load: "
                            f"{terminal(str(exc).splitlines()[0][:300]) if str(exc) else type(exc).__name__}.") from exc


@dataclasses.dataclass
class TorchSource:
    """A torch.export program run by torch, standing where export otherwise holds a Keras model: channels-first
    (the program's) input fed from NHWC images, its outputs as export's reference."""

    path: Path
    program: object  # torch.export.ExportedProgram
    module: object  # its GraphModule
    shape: tuple  # the program's input shape, (1, C, H, W)
    layout: str = "nhwc"  # the files' input layout: nhwc (to_channel_last_io) or, with --layout nchw, the program's
    preprocessing: Preprocessing | None = None
    files: dict = dataclasses.field(default_factory=dict)  # format key -> bytes, each file converted once

    @property
    def output_kind(self) -> str:
        last = [n for n in self.module.graph.nodes if n.op == "call_function"][-1:]
        softmax = bool(last) and "softmax" in str(last[0].target)
        return "probabilities" if softmax else "logits"

    @property
    def integer(self) -> bool:
        return False

    def count_params(self) -> int:
        return int(sum(int(np.prod(tuple(t.shape))) for t in self.program.state_dict.values()))

    def predict(self, x: np.ndarray, batch_size: int = 32, verbose: int = 0) -> np.ndarray:
        """The program's outputs for preprocessed NHWC images, one at a time (its batch is 1)."""
        del batch_size, verbose
        torch, _ = _modules()
        with torch.no_grad():
            rows = [self.module(torch.from_numpy(np.ascontiguousarray(x[i:i + 1].transpose(0, 3, 1, 2),
                                                                      np.float32)))
                    for i in range(len(x))]
        return np.concatenate([(r[0] if isinstance(r, (tuple, list)) else r).numpy() for r in rows]) if rows else \
            np.empty((0, 0), np.float32)

    def feed(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed NHWC images as the files' input tensor (the calibration images of int8 and onnx-int8)."""
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if self.layout == "nchw" else x, np.float32)

    def _converted(self):
        """(the module the files are made from, a sample input): the program wrapped to take NHWC images
        (litert-torch's to_channel_last_io), or the program itself with --layout nchw."""
        torch, litert_torch = _modules()
        _, c, h, w = self.shape
        if self.layout == "nchw":
            return self.module, (torch.zeros(1, c, h, w),)
        return litert_torch.to_channel_last_io(self.module, args=[0]), (torch.zeros(1, h, w, c),)

    def _tflite(self, model) -> bytes:
        with tempfile.TemporaryDirectory(prefix="edgekit-torch-") as tmp:
            target = os.path.join(tmp, "model.tflite")
            model.export(target)
            return Path(target).read_bytes()

    def float32(self) -> tuple[bytes, dict]:
        if "float32" not in self.files:
            _, litert_torch = _modules()
            module, sample = self._converted()
            try:
                with _quiet():
                    self.files["float32"] = self._tflite(litert_torch.convert(module, sample))
            except Exception as exc:  # noqa: BLE001 -- litert-torch raises assorted types
                raise ConversionError(f"litert-torch could not convert the program: {terminal(str(exc)[:300])}") from exc
        return self.files["float32"], {"converted_by": _tool()}

    def int8(self, calibration: np.ndarray) -> tuple[bytes, dict]:
        """PT2E static int8, calibrated on `calibration` (preprocessed NHWC images), one image per run."""
        if "int8" not in self.files:
            torch, litert_torch = _modules()
            from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
            from litert_torch.quantize.quant_config import QuantConfig
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            module, sample = self._converted()
            quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            try:
                with _quiet():
                    prepared = prepare_pt2e(torch.export.export(module, sample).module(), quantizer)
                    with torch.no_grad():
                        fed = self.feed(calibration)
                        for i in range(len(fed)):
                            prepared(torch.from_numpy(fed[i:i + 1]))
                    converted = convert_pt2e(prepared, fold_quantize=False)
                    self.files["int8"] = self._tflite(litert_torch.convert(
                        converted, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer)))
            except Exception as exc:  # noqa: BLE001 -- torch and litert-torch raise assorted types
                raise ConversionError(f"litert-torch could not quantize the program to int8: "
                                      f"{terminal(str(exc)[:300])}") from exc
        return self.files["int8"], {"quantized_by": {**_tool(), "recipe": RECIPE}}

    def quantize(self, key: str) -> tuple[bytes, dict]:
        """The float file's `dynamic` or `float16` file, by ai-edge-quantizer (export/edge_quantizer.py): litert-torch
        makes float and PT2E int8 files only."""
        if key not in self.files:
            self.files[key] = edge_quantizer.quantize(self.float32()[0], key)
        return self.files[key], {"converted_by": _tool(), **edge_quantizer.record(key)}

    def onnx(self, metadata: dict[str, str], opset: int | None) -> tuple[object, dict]:
        """(the float ModelProto by torch.onnx.export's dynamo exporter, what the sidecar records of how it was
        made): batch 1 as the program, NHWC unless --layout nchw, `metadata` added."""
        torch, _ = _modules()
        module, sample = self._converted()
        try:
            with _quiet():
                program = torch.onnx.export(torch.export.export(module, sample), dynamo=True, optimize=True,
                                            opset_version=opset)
        except ImportError as exc:
            raise EdgeKitError(f"an ONNX file from a .pt2 program needs {exc.name or 'onnxscript'} (torch's ONNX "
                               f"exporter): {EXTRA}.") from None
        except Exception as exc:  # noqa: BLE001 -- torch.onnx raises assorted types
            raise ConversionError(f"torch.onnx.export could not export the program: {terminal(str(exc)[:300])}") \
                from exc
        proto = program.model_proto
        del proto.metadata_props[:]
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        return proto, {"converted_by": {"tool": "torch.onnx.export (dynamo)", "version": torch.__version__,
                                        "onnxscript": importlib.metadata.version("onnxscript")}}

    def producer(self) -> str:
        torch, _ = _modules()
        return f"PyTorch {torch.__version__} (torch.export)"


def _tool() -> dict:
    return {"tool": "litert-torch", "version": importlib.metadata.version("litert-torch")}


@contextlib.contextmanager
def _quiet():
    """litert-torch's step-by-step progress lines (stdout) and torch's deprecation warnings: kept off export's own
    output."""
    logging.disable(logging.WARNING)  # litert-torch warns on the root logger
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def load_source(path: Path, dataset_name: str | None, data_dir, options, trust: bool) -> tuple[TorchSource, object]:
    """(the PyTorch source, the dataset with its preprocessing), or one clear line why not."""
    if dataset_name is None:
        raise EdgeKitError(f"{path} is a bare model file, so its labels and test images are unknown; pass --dataset "
                           "NAME (e.g. --dataset digits), and --mean/--std as the model was trained (pixel units: "
                           "127.5 and 127.5 for Normalize(0.5, 0.5)).")
    program = load_program(path, trust)
    module = program.module()
    inputs = [n for n in module.graph.nodes if n.op == "placeholder"]
    shape = tuple(getattr(inputs[0].meta.get("val"), "shape", ())) if len(inputs) == 1 else ()
    if len(shape) != 4 or shape[0] != 1 or shape[1] not in (1, 3) or not all(isinstance(d, int) for d in shape):
        raise EdgeKitError(f"{path.name} takes {len(inputs)} input(s) of shape {list(shape) or '?'}; an image "
                           "classifier's program takes one (1, C, H, W) image (C 1 or 3): export it with "
                           "torch.export.export(module, (torch.zeros(1, C, H, W),)).")
    layout = (options.layout if options is not None else None) or "nhwc"  # --layout nchw: the program's own
    source = TorchSource(path, program, module, shape, layout)
    classes = int(np.prod(source.predict(np.zeros((1, shape[2], shape[3], shape[1]), np.float32)).shape[1:]))
    dataset = dataset_for_model(path, dataset_name, data_dir, (shape[2], shape[3], shape[1]), classes)
    if options is not None and (options.mean is not None or options.std is not None):
        source.preprocessing = Preprocessing.in_pixel_units(dataset.preprocessing.size, shape[1], options.mean,
                                                            options.std, dataset.preprocessing)
        dataset = dataclasses.replace(dataset, preprocessing=source.preprocessing)
    return source, dataset

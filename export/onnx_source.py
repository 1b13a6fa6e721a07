"""An ONNX file EdgeKit did not make (PyTorch's `torch.onnx.export`, any exporter) as a source of export.

    python -m export --onnx --quantize int8 model.onnx --dataset digits --mean 127.5 --std 127.5

The float file is the reference every file is verified against, as the Keras model is for EdgeKit's own:
onnxruntime runs it on the test split, with the preprocessing given (`--mean/--std` in pixel units, as
torchvision's Normalize times 255; the dataset's 0..1 scaling when none is given) in the model's layout (NCHW
read from a channels-first shape, `--layout` where the shape reads both ways). What it writes:

- `model.onnx-float32.onnx`: the source graph, upgraded to opset 13 when older (onnxruntime's QDQ int8 needs
  13: at opset 11 it writes a DequantizeLinear with an `axis` onnxruntime rejects), its external data
  (`model.onnx.data`, from the dynamo exporter) taken in, EdgeKit's metadata added; verified by the float rule;
- `model.onnx-int8.onnx` (and `onnx-int8-mixed` with `--keep-float NODE,...`, nodes by their ONNX names):
  onnxruntime's static QDQ quantization calibrated on the training split, verified by the quantized rule;
- a manifest recording the source file's sha256, producer and opset, the preprocessing and layout, the dataset.

Everything read from the file is untrusted: external data must be a file beside the model (no absolute path,
no `..`, inside the file's length), the graph must be an image classifier that onnxruntime runs.
TFLite files from an ONNX source are not made (see the README, "Models from PyTorch").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from export.runtime_source import RuntimeSource
from runtime.backends.onnx_proto import beside
from runtime.datasets import dataset_for_model
from runtime.errors import ArtifactError, ConversionError, EdgeKitError
from runtime.fsutil import check_readable_file
from runtime.load import NotAClassifier, load

MIN_OPSET = 13  # onnxruntime's per-channel QDQ int8 needs it
MAX_PROTO_BYTES = 2 << 30  # protobuf's limit for one serialized model
TFLITE_REFUSAL = ("a TFLite file is not made from an ONNX source: no ONNX-to-TFLite converter runs on EdgeKit's "
                  "known-good stack (onnx2tf pins tensorflow 2.19 and onnxruntime 1.23; see the README, "
                  "\"Models from PyTorch\"); save the PyTorch module with torch.export.save and export that .pt2 "
                  "file: EdgeKit converts it with litert-torch (the torch extra)")
# operators that move or reshape a tensor without computing: a keep set reaches through them (export/selective.py)
PASS_THROUGH_OPS = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout",
                              "MaxPool", "Pad", "Relu", "Clip", "Shape", "Gather", "Concat", "Slice"})
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "AveragePool",
                         "GlobalAveragePool", "Sigmoid", "Softmax", "HardSwish", "HardSigmoid"})


@dataclasses.dataclass
class ONNXSource(RuntimeSource):
    """A float ONNX classifier run by onnxruntime, standing where export otherwise holds a Keras model."""

    proto: object  # onnx.ModelProto, external data not loaded
    data_files: list[str]  # external data files beside it

    def count_params(self) -> int:
        return int(sum(int(np.prod(t.dims)) for t in self.proto.graph.initializer))

    def feed(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed NHWC images as the model's input tensor (NCHW for a channels-first model), as the runtime
        lays them out (runtime.backends.model.Model.to_layout)."""
        return self.runtime.to_layout(x)

    def opset(self) -> int:
        return next((o.version for o in self.proto.opset_import if o.domain in ("", "ai.onnx")), 0)

    def producer(self) -> dict:
        return {"name": self.proto.producer_name, "version": self.proto.producer_version}


def is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def _all_tensors(graph):
    """Every tensor a graph holds, in its subgraphs too (an If's branches, a Loop's or Scan's body): initializers,
    sparse initializers' values and indices, and the tensors of node attributes. Any of them may name external
    data."""
    for tensor in graph.initializer:
        yield tensor
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sparse in ([attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []) + list(
                    attribute.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _all_tensors(sub)


def external_data(path: Path, proto) -> list[str]:
    """The external data files the graph names, each checked: a file inside the model's directory that holds
    every byte range the graph reads from it. Anything else is refused before onnx or onnxruntime opens it."""
    import onnx

    files: dict[str, int] = {}
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {e.key: e.value for e in tensor.external_data}
        location = entry.get("location", "")
        try:
            target = beside(path, location)
        except ValueError:
            raise ArtifactError(f"{path} stores tensor {tensor.name!r} in {location!r}, outside the model's "
                                "directory; external data must be a file beside the model. Refused.") from None
        if location not in files:
            if not target.is_file():
                raise EdgeKitError(f"{path} stores its weights in {location}, which is not beside it; copy "
                                   f"{location} into {path.parent} with the model.")
            files[location] = target.stat().st_size
        try:
            offset, length = int(entry.get("offset", 0) or 0), int(entry.get("length", -1) or -1)
        except ValueError:
            raise ArtifactError(f"{path} gives tensor {tensor.name!r} an offset or length that is not a number; "
                                "the file is damaged.") from None
        if offset < 0 or offset > files[location] or (length >= 0 and offset + length > files[location]):
            raise ArtifactError(f"{path} reads tensor {tensor.name!r} from bytes {offset:,}+{length:,} of "
                                f"{location}, which holds {files[location]:,}; the data file is truncated or not "
                                "this model's.")
    return sorted(files)


def load_source(path: Path, dataset_name: str | None, data_dir, options) -> tuple[ONNXSource, object]:
    """(the ONNX source, the dataset with the model's preprocessing), or one clear line why not."""
    import onnx

    info = check_readable_file(path, "model file")
    if info.st_size > MAX_PROTO_BYTES:
        raise EdgeKitError(f"{path} is {info.st_size / 2**30:.1f} GiB; an ONNX file holds at most 2 GiB (larger "
                           "models keep their weights in external data).")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and assorted others from protobuf
        raise ArtifactError(f"{path} is not a readable ONNX file ({type(exc).__name__}); expected a model written "
                            "by torch.onnx.export or another ONNX exporter.") from None
    data_files = external_data(path, proto)
    if dataset_name is None:
        raise EdgeKitError(f"{path} is a bare model file, so its labels and calibration data are unknown; pass "
                           "--dataset NAME (e.g. --dataset digits), and --mean/--std as the model was trained "
                           "(pixel units: 127.5 and 127.5 for Normalize(0.5, 0.5)).")
    try:
        runtime = load(path, mean=options.mean, std=options.std, layout=options.layout, resize=options.resize)
    except NotAClassifier as exc:
        raise EdgeKitError(f"{exc} Export verifies classifiers only; `python -m runtime predict --raw` and "
                           "`bench` run any model.") from None
    if runtime.input.dtype in ("int8", "uint8"):
        raise EdgeKitError(f"{path} takes {runtime.input.dtype} input: it is quantized already; export takes a "
                           "float model (the one it was quantized from).")
    if runtime.input.dtype != "float32":
        raise EdgeKitError(f"{path} takes {runtime.input.dtype} input; export takes an image classifier with "
                           "float32 input (the pixels preprocessed). `python -m runtime predict --raw` and `bench` "
                           "run any model.")
    dataset = dataset_for_model(path, dataset_name, data_dir, runtime.input_shape, runtime.num_classes)
    if runtime.preprocessing is not None:
        dataset = dataclasses.replace(dataset, preprocessing=runtime.preprocessing)
    return ONNXSource(path, runtime, proto, data_files), dataset


def float_model(source: ONNXSource, metadata: dict[str, str]) -> tuple[object, dict]:
    """The float ModelProto EdgeKit writes (opset 13 at least, external data taken in, metadata added), and
    what the sidecar records of how it was made."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(source.path))  # the external data, checked by external_data(), is read now
    record = {"source_opset": source.opset(), "producer": source.producer(), "external_data": source.data_files}
    if source.opset() < MIN_OPSET:
        try:
            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:  # the converter raises assorted types
            raise ConversionError(f"onnx.version_converter could not upgrade {source.path.name} from opset "
                                  f"{source.opset()} to {MIN_OPSET}: {exc}") from None
        record["upgraded_to_opset"] = MIN_OPSET
    for tensor in model.graph.initializer:  # all data now inside: the file EdgeKit writes is self-contained
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    for key, value in [*kept, *metadata.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    if model.ByteSize() > MAX_PROTO_BYTES:
        raise ConversionError(f"{source.path.name} with its external data is over 2 GiB, which one ONNX file "
                              "cannot hold; EdgeKit does not write external data.")
    return model, record


def node_selective(source: ONNXSource, float_proto, calibration: np.ndarray, method: str, metadata: dict):
    """Selective int8 on a foreign ONNX graph (export.selective.ONNXSelective's calibrate once, quantize again):
    the "layers" are its computing nodes by their ONNX names (what Netron shows), each kept float with the
    computing nodes that consume its output through operators that only move data (its keep set)."""
    import onnx

    from export.selective import Layer, ONNXSelective

    class NodeSelective(ONNXSelective):
        def _assign(self, nodes):
            del nodes  # named by the graph itself, not mapped to Keras layers
            graph = onnx.load(self._prepared).graph
            consumers: dict[str, list] = {}
            for node in graph.node:
                for name in node.input:
                    consumers.setdefault(name, []).append(node)

            def keep(node) -> list[str]:
                found, stack = [node.name], list(node.output)
                while stack:
                    for user in consumers.get(stack.pop(), []):
                        if user.op_type in PASS_THROUGH_OPS:
                            stack.extend(user.output)
                        elif user.op_type in COMPUTE_OPS and user.name and user.name not in found:
                            found.append(user.name)
                return found

            computing = [n for n in graph.node if n.name and n.op_type in COMPUTE_OPS]
            self.nodes_of = {n.name: [n.name] for n in computing}
            self.layers = {n.name: Layer(n.name, n.op_type, [n.name], keep(n)) for n in computing}

    return NodeSelective(source, float_proto, source.feed(calibration), method, metadata)

"""ONNX files read without the onnx package (the runtime's plain install stays light): protobuf's wire format,
every length checked against its bounds, and just the fields EdgeKit needs. tests/test_fileinfo.py checks it
against onnx's own parser."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

# onnxruntime's tensor type names as numpy dtype names
ONNX_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(int32)": "int32",
               "tensor(int64)": "int64", "tensor(bool)": "bool", "tensor(string)": "string"}


def _protobuf_fields(data: bytes, start: int, end: int, values: bool = False):
    """(field number, (start, end) of a length-delimited value or None) of each field in data[start:end], read
    from protobuf's wire format with every length checked against the bounds; with `values`, a varint field's
    value instead of None."""
    def varint(i):
        value = shift = 0
        while True:
            if i >= end or shift > 63:
                raise ValueError("truncated varint")
            byte = data[i]
            value |= (byte & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if byte < 0x80:
                return value, i

    i = start
    while i < end:
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            value, i = varint(i)
            yield key >> 3, (value if values else None)
        elif wire == 2:
            n, i = varint(i)
            if i + n > end:
                raise ValueError("length beyond the message")
            yield key >> 3, (i, i + n)
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            yield key >> 3, None
        else:
            raise ValueError(f"wire type {wire}")
    if i != end:
        raise ValueError("field beyond the message")


def onnx_producers(data: bytes) -> dict[str, tuple[str, list[str]]]:
    """output name -> (op_type, inputs) of every node in an ONNX ModelProto's main graph (ModelProto.graph = 7,
    GraphProto.node = 1, NodeProto.input = 1, .output = 2, .op_type = 4), without the onnx package."""
    producers = {}
    for field, span in _protobuf_fields(data, 0, len(data)):
        if field != 7 or span is None:
            continue
        for node_field, node in _protobuf_fields(data, *span):
            if node_field != 1 or node is None:
                continue
            parts = {1: [], 2: [], 4: []}
            for part, value in _protobuf_fields(data, *node):
                if part in parts and value is not None:
                    parts[part].append(bytes(data[value[0]:value[1]]).decode("utf-8", "replace"))
            for output in parts[2]:
                producers[output] = ((parts[4] or [""])[0], parts[1])
    return producers


def _text(data: bytes, span) -> str:
    return bytes(data[span[0]:span[1]]).decode("utf-8", "replace") if isinstance(span, tuple) else ""


# where tensors sit: GraphProto.initializer 5 and sparse_initializer 15, NodeProto.attribute 5; AttributeProto.t 5,
# g 6 (a subgraph: If's branches, Loop's and Scan's body), tensors 10, graphs 11, sparse_tensor 22, sparse_tensors
# 23; SparseTensorProto.values 1 and indices 2; TensorProto.external_data 13 (StringStringEntryProto: key 1, value 2)
MAX_GRAPH_DEPTH = 32  # subgraphs within subgraphs: protobuf's own parser stops at 100 nested messages


def _tensor_location(data: bytes, span) -> str | None:
    for part, entry in _protobuf_fields(data, *span):
        if part == 13 and entry is not None:
            pair = dict(_protobuf_fields(data, *entry))
            if pair.get(1) is not None and _text(data, pair[1]) == "location" and pair.get(2):
                return _text(data, pair[2])
    return None


def _external_locations(data: bytes, graph, depth: int = 0) -> set[str]:
    """The external data files named by any tensor of a GraphProto, in its subgraphs too, at any depth up to
    MAX_GRAPH_DEPTH: an If's branch can name a file as well as the main graph's initializers."""
    if depth > MAX_GRAPH_DEPTH:
        raise ValueError(f"subgraphs nested deeper than {MAX_GRAPH_DEPTH}")
    tensors, found = [], set()
    for field, span in _protobuf_fields(data, *graph):
        if span is None:
            continue
        if field == 5:
            tensors.append(span)
        elif field == 15:
            tensors += [s for part, s in _protobuf_fields(data, *span) if part in (1, 2) and s is not None]
        elif field == 1:
            for part, attribute in _protobuf_fields(data, *span):
                if part != 5 or attribute is None:
                    continue
                for kind, item in _protobuf_fields(data, *attribute):
                    if item is None:
                        continue
                    if kind in (5, 10):
                        tensors.append(item)
                    elif kind in (22, 23):
                        tensors += [s for p, s in _protobuf_fields(data, *item) if p in (1, 2) and s is not None]
                    elif kind in (6, 11):
                        found |= _external_locations(data, item, depth + 1)
    return found | {name for span in tensors if (name := _tensor_location(data, span)) is not None}


def onnx_summary(data: bytes) -> dict:
    """What an ONNX ModelProto says of itself: ir_version (1), producer_name (2) and producer_version (3), the
    default domain's opset (opset_import = 8: domain 1, version 2), the main graph's operator census (graph
    = 7, node = 1, op_type = 4, domain = 7), and the files any of its tensors keep external data in, subgraphs
    included (`_external_locations`). Raises ValueError on a malformed file."""
    summary = {"ir_version": None, "producer": "", "producer_version": "", "opsets": {}, "ops": Counter(),
               "external_data": set()}
    for field, value in _protobuf_fields(data, 0, len(data), values=True):
        if field == 1 and isinstance(value, int):
            summary["ir_version"] = value
        elif field in (2, 3) and isinstance(value, tuple):
            summary["producer" if field == 2 else "producer_version"] = _text(data, value)
        elif field == 8 and isinstance(value, tuple):
            domain, version = "", None
            for part, item in _protobuf_fields(data, *value, values=True):
                if part == 1 and isinstance(item, tuple):
                    domain = _text(data, item)
                elif part == 2 and isinstance(item, int):
                    version = item
            summary["opsets"][domain or "ai.onnx"] = version
        elif field == 7 and isinstance(value, tuple):
            summary["external_data"].update(_external_locations(data, value))
            for node_field, node in _protobuf_fields(data, *value):
                if node_field != 1 or node is None:
                    continue
                op, domain = "", ""
                for part, item in _protobuf_fields(data, *node):
                    if part == 4 and item is not None:
                        op = _text(data, item)
                    elif part == 7 and item is not None:
                        domain = _text(data, item)
                summary["ops"][f"{domain}.{op}" if domain and domain != "ai.onnx" else op] += 1
    summary["ops"] = dict(summary["ops"])
    summary["external_data"] = sorted(summary["external_data"])
    return summary


def beside(model: Path, location: str) -> Path:
    """The file an external data `location` names, when it is a plain relative path inside the model's directory
    (no absolute path, no '..', no link out of it); ValueError otherwise. The one rule for external data, here and
    in export."""
    directory = model.parent.resolve()
    target = (model.parent / location).resolve() if location and "\0" not in location else None
    if (target is None or Path(location).is_absolute() or ".." in Path(location).parts
            or not target.is_relative_to(directory)):
        raise ValueError(f"external data {location!r} outside the model's directory; external data must be a file "
                         "beside the model")
    return target


def external_files(model: Path, data: bytes) -> list[Path]:
    """The external data files any tensor of the model names (subgraphs included), each checked by `beside`.
    Every tensor that names one carries the key "location": a file without the word has none."""
    if b"location" not in data:
        return []
    summary = onnx_summary(data)
    return [beside(model, name) for name in summary["external_data"]]

"""TFLite files with sparse tensors (the converter's `Optimize.EXPERIMENTAL_SPARSITY`: a pruned model's weights
stored as their non-zero values and indices, so the file is smaller) run here at dense speed: the weights are
densified when the file is loaded, in memory, and the file on disk stays small.

Why: LiteRT's XNNPACK delegate refuses a sparse int8 or dynamic-range file outright ("failed to delegate
FULLY_CONNECTED"), and LiteRT's own kernels run it 4x slower than the dense file through XNNPACK (a pruned
fashion_cnn at 1 thread: 0.45 ms against 0.10 ms). A float32 sparse file keeps a DENSIFY op per weight, which
runs once. Densified, every sparse file is the dense file's graph and runs as fast.

The decoding follows TFLite's sparsity format (tensorflow/lite/schema/schema.fbs, SparsityParameters; the
reference is tflite::internal::sparsity::FormatConverter::SparseToDense): the dimensions are visited in
`traversal_order`, dense ones over their size, SPARSE_CSR ones over the index range their segment array gives,
and block dimensions (after the tensor's rank) scale the dimension `block_map` names. Vectorized with numpy:
one pass per dimension, not one Python call per value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.errors import ArtifactError

_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 7: np.int16, 9: np.int8}
DENSE, SPARSE_CSR = 0, 1
# a sparse file is untrusted: what its tensors claim to densify into is bounded before anything is allocated.
# 64 times the file (a model pruned to 95% stores a twentieth of its values, plus indices), and 2 GiB at most
GROWTH, MAX_DENSE_BYTES = 64, 2 << 30


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def sparse_tensors(data: bytes) -> int:
    """How many tensors of the file are stored sparse (0 for a dense file). Reads the flatbuffer's tables lazily:
    no copy of the weights."""
    schema = _schema()
    try:
        if not schema.Model.ModelBufferHasIdentifier(data, 0):
            return 0
        model = schema.Model.GetRootAs(data, 0)
        return sum(model.Subgraphs(s).Tensors(t).Sparsity() is not None
                   for s in range(model.SubgraphsLength()) for t in range(model.Subgraphs(s).TensorsLength()))
    except Exception:  # a damaged file: the interpreter says what is wrong with it
        return 0


def sparse_file(path: str | Path) -> int:
    """`sparse_tensors` of a file, its flatbuffer tables read through a memory map: only the pages they touch."""
    import mmap

    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return sparse_tensors(view)
    except (OSError, ValueError):  # missing, unreadable or empty: the interpreter says what is wrong
        return 0


def _vector(union) -> np.ndarray:
    return np.asarray(union.values if union is not None and union.values is not None else [], dtype=np.int64)


def dense_values(values: np.ndarray, shape: list[int], sparsity) -> np.ndarray:
    """The dense array of a sparse tensor: `values` (its stored non-zeros, in traversal order) put back at their
    places in an array of `shape`."""
    if any(d < 0 for d in shape) or int(np.prod(shape, dtype=np.float64)) * values.itemsize > MAX_DENSE_BYTES:
        raise ValueError(f"a dense shape of {shape} is more than {MAX_DENSE_BYTES >> 30} GiB")
    order = [int(d) for d in sparsity.traversalOrder]
    block_map = [int(d) for d in (sparsity.blockMap if sparsity.blockMap is not None else [])]
    meta = sparsity.dimMetadata
    rank = len(shape)
    if len(order) != len(meta) or len(order) != rank + len(block_map) or sorted(order) != list(range(len(order))):
        raise ValueError("inconsistent sparsity parameters")
    prev = np.zeros(1, np.int64)  # per entry so far: its position at this level (dense: flattened; CSR: index)
    indices: list[np.ndarray] = []
    places = max(int(np.prod(shape, dtype=np.float64)), 1)
    for level in meta:
        if level.format == DENSE:
            size = int(level.denseSize)
            if size < 0 or len(prev) * size > places:  # a level cannot visit more places than the tensor has
                raise ValueError(f"a dense dimension of {size} in a tensor of shape {shape}")
            indices = [np.repeat(i, size) for i in indices] + [np.tile(np.arange(size), len(prev))]
            prev = (prev[:, None] * size + np.arange(size)).ravel()
        else:
            segments, where = _vector(level.arraySegments), _vector(level.arrayIndices)
            if len(prev) and (prev.max() + 1 >= len(segments)):
                raise ValueError("a segment array shorter than its dimension")
            starts, ends = segments[prev], segments[prev + 1]
            counts = np.maximum(ends - starts, 0)
            if counts.sum() > places:
                raise ValueError(f"segments that list more values than a tensor of shape {shape} holds")
            positions = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
            if positions.size and positions.max() >= len(where):
                raise ValueError("an index array shorter than its segments say")
            indices = [np.repeat(i, counts) for i in indices] + [where[positions]]
            prev = positions
    if len(prev) != values.size:
        raise ValueError(f"{values.size} stored values for {len(prev)} places")
    original = [None] * rank
    for position, dim in enumerate(order[:rank]):
        original[dim] = indices[position]
    for position in range(rank, len(order)):
        block = order[position] - rank
        dim = block_map[block]
        original[dim] = original[dim] * int(meta[position].denseSize) + indices[position]
    dense = np.zeros(shape, values.dtype)
    dense[tuple(original)] = values
    return dense


def densify(data: bytes) -> bytes:
    """The same model with every sparse tensor stored dense and every DENSIFY op folded away; `data` as it is
    when nothing in it is sparse. Raises ArtifactError on sparsity parameters that do not add up."""
    if not sparse_tensors(data):
        return data
    import flatbuffers

    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    budget = min(GROWTH * len(data), MAX_DENSE_BYTES)
    try:
        for graph in model.subgraphs:
            claimed = sum(int(np.prod([int(d) for d in t.shape], dtype=np.float64)) * np.dtype(_DTYPES.get(t.type, np.int8)).itemsize
                          for t in graph.tensors if t.sparsity is not None and t.shape is not None)
            if claimed > budget:
                raise ValueError(f"its sparse tensors claim {claimed:,} bytes dense, more than {budget:,} "
                                 f"({GROWTH} times the file)")
            for tensor in graph.tensors:
                if tensor.sparsity is None:
                    continue
                buffer = model.buffers[tensor.buffer]
                dtype = _DTYPES.get(tensor.type)
                if dtype is None or buffer.data is None:
                    raise ValueError(f"tensor {tensor.name!r}: sparse {dtype or tensor.type} data not supported")
                values = np.frombuffer(np.asarray(buffer.data, np.uint8).tobytes(), dtype)
                dense = dense_values(values, [int(d) for d in tensor.shape], tensor.sparsity)
                buffer.data = np.frombuffer(dense.tobytes(), np.uint8)
                tensor.sparsity = None
            densify_op = {i for i, code in enumerate(model.operatorCodes)
                          if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.DENSIFY}
            kept = []
            for op in graph.operators:
                if op.opcodeIndex in densify_op:  # its output becomes the (now dense) constant it read
                    graph.tensors[op.outputs[0]].buffer = graph.tensors[op.inputs[0]].buffer
                else:
                    kept.append(op)
            graph.operators = kept
    except (ValueError, IndexError, TypeError) as exc:
        raise ArtifactError(f"its sparse tensors do not add up: {exc}") from exc
    builder = flatbuffers.Builder(len(data) * 4 + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def interpreter(path: str | Path | None = None, content: bytes | None = None, **kwargs):
    """A LiteRT Interpreter of a file or its bytes, its sparse tensors densified first (see the module)."""
    from ai_edge_litert.interpreter import Interpreter

    if content is None:  # the file's tables are read in place (mmap): a dense file is not read twice
        if not sparse_file(path):
            return Interpreter(model_path=str(path), **kwargs)
        content = Path(path).read_bytes()
    elif not sparse_tensors(content):
        return Interpreter(model_content=content, **kwargs)
    try:
        dense = densify(content)
    except ArtifactError as exc:
        raise ValueError(str(exc)) from exc  # as the interpreter reports a file it cannot read
    return Interpreter(model_content=dense, **kwargs)

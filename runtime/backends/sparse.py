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

import mmap
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from runtime.errors import ArtifactError

_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 7: np.int16, 9: np.int8}
DENSE, SPARSE_CSR = 0, 1
# a sparse file is untrusted: what its tensors claim to densify into is bounded before anything is allocated.
# 64 times the file (a model pruned to 95% stores a twentieth of its values, plus indices), and 2 GiB at most
GROWTH, MAX_DENSE_BYTES = 64, 2 << 30


def flatbuffer_schema():
    return schema


def sparse_tensors(data: bytes) -> int:
    """How many tensors of the file are stored sparse (0 for a dense file). Reads the flatbuffer's tables lazily:
    no copy of the weights."""
    schema = flatbuffer_schema()
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

    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return sparse_tensors(view)
    except (OSError, ValueError):  # missing, unreadable or empty: the interpreter says what is wrong
        return 0


def _vector(union) -> np.ndarray:
    return np.asarray(union.values if union is not None and union.values is not None else [], dtype=np.int64)


def _level_sizes(shape: list[int], order: list[int], block_map: list[int], meta) -> list[int]:
    """How many places each traversal level has: a dimension's size (over its block size, where blocked), or a
    block dimension's size."""
    rank = len(shape)
    blocks = {}
    for b, dim in enumerate(block_map):
        size = int(meta[order.index(rank + b)].denseSize)
        if not 0 <= dim < rank or size < 1 or shape[dim] % size:
            raise ValueError(f"a block of {size} in dimension {dim} of a tensor of shape {shape}")
        blocks[dim] = size
    return [shape[d] // blocks.get(d, 1) if d < rank else blocks[block_map[d - rank]] for d in order]


def _check_csr(segments: np.ndarray, where: np.ndarray, rows: int, size: int) -> None:
    """A SPARSE_CSR level as TFLite writes it, or ValueError: one segment per row (rows + 1 offsets, from 0 to the
    number of indices, never decreasing), every index in [0, size), and within a row increasing (no index twice).
    numpy would otherwise wrap a negative index and keep the last of two values at one place: a silent wrong
    weight."""
    if len(segments) != rows + 1 or segments[0] != 0 or segments[-1] != len(where):
        raise ValueError(f"a segment array of {len(segments)} offsets (from {segments[:1].tolist()} to "
                         f"{segments[-1:].tolist()}) for {rows} rows and {len(where)} indices; expected {rows + 1}, "
                         f"from 0 to {len(where)}")
    if (np.diff(segments) < 0).any():
        raise ValueError("a segment array that goes back")
    if len(where) and (where.min() < 0 or where.max() >= size):
        raise ValueError(f"indices from {where.min()} to {where.max()} in a dimension of {size}")
    steps = np.diff(where)
    first = segments[1:-1]  # where a row starts: the step into it is not within a row
    within = np.ones(len(steps), bool)
    within[first[(first > 0) & (first < len(where))] - 1] = False
    if (steps[within] <= 0).any():
        raise ValueError("indices within a row that repeat or go back")


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
    sizes = _level_sizes(shape, order, block_map, meta)
    prev = np.zeros(1, np.int64)  # per entry so far: its position at this level (dense: flattened; CSR: index)
    indices: list[np.ndarray] = []
    for level, size in zip(meta, sizes):
        if level.format == DENSE:
            if int(level.denseSize) != size:
                raise ValueError(f"a dense dimension of {int(level.denseSize)} where the shape {shape} has {size}")
            indices = [np.repeat(i, size) for i in indices] + [np.tile(np.arange(size), len(prev))]
            prev = (prev[:, None] * size + np.arange(size)).ravel()
        else:
            segments, where = _vector(level.arraySegments), _vector(level.arrayIndices)
            _check_csr(segments, where, len(prev), size)
            starts, ends = segments[prev], segments[prev + 1]
            counts = ends - starts
            positions = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
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

    schema = flatbuffer_schema()
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

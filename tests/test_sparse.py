"""TFLite's sparse tensors decoded as TFLite's FormatConverter does (tensorflow/lite/kernels/internal/utils/
sparsity_format_converter.cc): CSR rows, and blocks, on examples worked out by hand."""

import numpy as np
import pytest

from runtime.backends.sparse import dense_values


def _sparsity(order, dims, block_map=()):
    from ai_edge_litert import schema_py_generated as schema

    params = schema.SparsityParametersT()
    params.traversalOrder, params.blockMap, params.dimMetadata = list(order), list(block_map), []
    for dim in dims:
        meta = schema.DimensionMetadataT()
        if isinstance(dim, int):
            meta.format, meta.denseSize = 0, dim
        else:
            segments, indices = schema.Int32VectorT(), schema.Int32VectorT()
            segments.values, indices.values = dim
            meta.format, meta.arraySegments, meta.arrayIndices = 1, segments, indices
            meta.arraySegmentsType = meta.arrayIndicesType = schema.SparseIndexVector.Int32Vector
        params.dimMetadata.append(meta)
    return params


def test_csr_rows():
    # row 0 holds columns 0 and 2, row 1 column 1, row 2 nothing, row 3 columns 0 and 3
    params = _sparsity([0, 1], [4, ([0, 2, 3, 3, 5], [0, 2, 1, 0, 3])])
    dense = dense_values(np.array([1, 2, 3, 4, 5], np.int8), [4, 4], params)
    assert dense.tolist() == [[1, 0, 2, 0], [0, 3, 0, 0], [0, 0, 0, 0], [4, 0, 0, 5]] and dense.dtype == np.int8


def test_two_by_two_blocks():
    # block row 0 holds block columns 0 and 1, block row 1 block column 1; each block's 4 values row by row
    params = _sparsity([0, 1, 2, 3], [2, ([0, 2, 3], [0, 1, 1]), 2, 2], block_map=[0, 1])
    dense = dense_values(np.arange(1, 13, dtype=np.float32), [4, 4], params)
    assert dense.tolist() == [[1, 2, 5, 6], [3, 4, 7, 8], [0, 0, 9, 10], [0, 0, 11, 12]]


def test_a_column_major_traversal():
    # traversal order (1, 0): the outer dimension is the column; column 0 holds rows 1 and 2
    params = _sparsity([1, 0], [3, ([0, 2, 2, 3], [1, 2, 0])])
    dense = dense_values(np.array([7, 8, 9], np.int32), [3, 3], params)
    assert dense.tolist() == [[0, 0, 9], [7, 0, 0], [8, 0, 0]]


def test_parameters_that_do_not_add_up_are_refused():
    params = _sparsity([0, 1], [4, ([0, 2, 3, 3, 5], [0, 2, 1, 0, 3])])
    with pytest.raises(ValueError, match="stored values"):
        dense_values(np.array([1, 2, 3], np.int8), [4, 4], params)  # five places, three values
    with pytest.raises(ValueError, match="segment array"):
        dense_values(np.zeros(5, np.int8), [4, 4], _sparsity([0, 1], [4, ([0, 2, 3], [0, 2, 1])]))


# --- whole files: tests/fixtures/sparse (scripts/make_sparse_fixtures.py), dense and sparse twins ---------------

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "sparse"


@pytest.mark.parametrize("key", ["float32", "int8"])
def test_a_sparse_file_runs_as_its_dense_twin(key):
    from runtime.load import load
    from runtime.backends.sparse import densify, sparse_tensors

    sparse, dense = (FIXTURES / f"{key}.{kind}.tflite" for kind in ("sparse", "dense"))
    assert sparse_tensors(sparse.read_bytes()) == 1 and sparse_tensors(dense.read_bytes()) == 0
    assert sparse.stat().st_size < dense.stat().st_size
    assert densify(dense.read_bytes()) == dense.read_bytes()  # nothing sparse: the bytes as they are
    x = np.random.default_rng(0).random((16, 8, 8, 1), np.float32)
    assert np.array_equal(load(sparse).logits(x), load(dense).logits(x))


def _hostile(tmp_path, change) -> "Path":
    """The int8 sparse fixture with its sparse tensor changed by `change(tensor)`."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf((FIXTURES / "int8.sparse.tflite").read_bytes(), 0)
    change(next(t for t in model.subgraphs[0].tensors if t.sparsity is not None))
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path = tmp_path / "hostile.tflite"
    path.write_bytes(bytes(builder.Output()))
    return path


def _huge(tensor):
    tensor.shape = np.array([1 << 20, 1 << 20], np.int32)  # 1 TiB of int8, claimed by a 6 KB file


def _bad_segments(tensor):
    tensor.sparsity.dimMetadata[1].arraySegments.values = np.array([0, 10**9], np.int32)


def _bad_indices(tensor):
    tensor.sparsity.dimMetadata[1].arrayIndices.values = np.array([10**6], np.int32)


@pytest.mark.parametrize("change", [_huge, _bad_segments, _bad_indices])
def test_a_hostile_sparse_file_is_one_line_and_no_memory_bomb(tmp_path, change):
    from conftest import run_module

    path = _hostile(tmp_path, change)
    done = run_module("runtime", "info", str(path), timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and str(path) in done.stderr


# --- round three (issue 36): indices that numpy would have taken -----------------------------------------------

def _negative_index(tensor):
    """One index -3: numpy counts it from the end, and the file ran with scrambled weights (predict --raw, exit 0)."""
    from ai_edge_litert import schema_py_generated as schema

    level = tensor.sparsity.dimMetadata[1]
    indices = schema.Int32VectorT()  # the converter wrote uint8 indices: a negative one needs int32
    indices.values = np.array(level.arrayIndices.values, np.int32)
    indices.values[0] = -3
    level.arrayIndices, level.arrayIndicesType = indices, schema.SparseIndexVector.Int32Vector


def _writable(tensor):
    """The CSR level's indices and segments, as arrays the test may change."""
    level = tensor.sparsity.dimMetadata[1]
    level.arrayIndices.values = np.array(level.arrayIndices.values)  # a copy, of the type the file declares
    level.arraySegments.values = np.array(level.arraySegments.values)
    return level.arrayIndices.values, level.arraySegments.values


def _repeated_index(tensor):
    """A row's second index equal to its first: two values at one place, the first silently lost."""
    indices, segments = _writable(tensor)
    row = next(r for r in range(len(segments) - 1) if segments[r + 1] - segments[r] >= 2)
    indices[segments[row] + 1] = indices[segments[row]]


def _swapped_indices(tensor):
    indices, segments = _writable(tensor)
    row = next(r for r in range(len(segments) - 1) if segments[r + 1] - segments[r] >= 2)
    a = segments[row]
    indices[a], indices[a + 1] = indices[a + 1], indices[a]


def _decreasing_segments(tensor):
    segments = _writable(tensor)[1]
    segments[1], segments[2] = segments[2], segments[1]


@pytest.mark.parametrize("change", [_negative_index, _repeated_index, _swapped_indices, _decreasing_segments])
def test_indices_and_segments_are_checked_for_range_order_and_repetition(tmp_path, change):
    """The first three loaded before and ran with weights unlike the original's; now each is one line, exit 1,
    from every command that reads it."""
    from conftest import run_module

    path = _hostile(tmp_path, change)
    image = tmp_path / "x.npy"
    np.save(image, np.zeros((1, 8, 8, 1), np.float32))
    for command in (["info", str(path)], ["predict", "--raw", str(path), str(image), "--out", str(tmp_path / "o.npz")]):
        done = run_module("runtime", *command, timeout=60)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "sparse tensors do not add up" in lines[0], done.stderr


def test_the_checks_accept_every_sparse_tensor_the_converter_wrote():
    """The converter's own files densify to their dense twins' weights (the checks refuse nothing it writes)."""
    from runtime.backends.sparse import densify

    for key in ("float32", "int8"):
        assert densify((FIXTURES / f"{key}.sparse.tflite").read_bytes())

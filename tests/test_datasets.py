"""Dataset loaders on data the tests write themselves: IDX (good, corrupt, truncated),
CIFAR batches, image folders, and the embedded digits."""

import pickle

import numpy as np
import pytest
from PIL import Image

from conftest import idx_bytes, make_idx_dir, write_idx
from runtime.datasets import SPLIT_SEED, load_dataset, stratified_split
from runtime.datasets.idx import parse_idx
from runtime.errors import EdgeKitError
from runtime.artifacts.preprocessing import Preprocessing


# --- digits ---------------------------------------------------------------------

def test_digits_is_28x28_scaled_and_split_by_a_fixed_seed(digits):
    assert digits.x_train.shape[1:] == (28, 28, 1) and digits.x_train.dtype == np.uint8
    sizes = digits.describe()["split"]["sizes"]
    assert sum(sizes.values()) == 1797 and sizes["test"] == 359
    assert digits.describe()["split"]["seed"] == SPLIT_SEED
    x, y = digits.arrays("test")
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() == pytest.approx(1.0)
    # Every class is in every split, in proportion.
    for split in ("train", "val", "test"):
        counts = np.bincount(getattr(digits, f"y_{split}"), minlength=10)
        assert counts.min() > 0.6 * counts.max()


def test_digits_splits_are_disjoint_and_the_same_every_time(digits):
    again = load_dataset("digits")
    np.testing.assert_array_equal(again.x_test, digits.x_test)
    flat = {split: {arr.tobytes() for arr in getattr(digits, f"x_{split}")} for split in ("train", "test")}
    # sklearn's digits hold a few exact duplicates; beyond those the splits share no image.
    assert len(flat["train"] & flat["test"]) <= 3


def test_embedded_digits_equal_scikit_learns():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from runtime.datasets.digits import raw

    images, target = raw()
    reference = sklearn_datasets.load_digits()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(target, reference.target)


def test_stratified_split_refuses_a_class_too_small_to_split():
    with pytest.raises(EdgeKitError, match="class 1 has 2 example"):
        stratified_split(np.array([0, 0, 0, 0, 1, 1]), 0.1, 0.2)


def test_resizing_a_dataset_updates_pixels_and_preprocessing():
    data = load_dataset("digits", image_size=(32, 32), channels=3)
    assert data.x_train.shape[1:] == (32, 32, 3)
    assert data.preprocessing.input_shape == (32, 32, 3)


def test_unknown_dataset_suggests_the_nearest_name():
    with pytest.raises(EdgeKitError, match="Did you mean 'fashion_mnist'"):
        load_dataset("fashion_mnst")


# --- IDX ------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    arrays = make_idx_dir(tmp_path, n_train=120, n_test=30, gz=gz)
    data = load_dataset("fashion_mnist", data_dir=tmp_path)
    assert data.labels[0] == "T-shirt/top" and data.labels[9] == "Ankle boot"
    np.testing.assert_array_equal(data.x_test[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert len(data.y_train) + len(data.y_val) == 120 and len(data.y_val) == 10
    assert data.input_shape == (28, 28, 1)


def test_mnist_reads_keras_cache_npz(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "datasets").mkdir()
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "datasets" / "mnist.npz",
             x_train=rng.integers(0, 256, (48, 28, 28), dtype=np.uint8), y_train=np.arange(48) % 10,
             x_test=rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), y_test=np.arange(12) % 10)
    data = load_dataset("mnist")
    assert len(data.y_test) == 12 and data.labels == tuple("0123456789")


def test_missing_idx_files_name_the_four_files(tmp_path):
    with pytest.raises(EdgeKitError) as info:
        load_dataset("fashion_mnist", data_dir=tmp_path)
    message = str(info.value)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert name in message
    assert str(tmp_path) in message


def test_offline_without_files_says_downloads_are_off():
    with pytest.raises(EdgeKitError, match="downloads are off.*--data-dir"):
        load_dataset("mnist")


def test_idx_rejects_a_bad_magic_number():
    with pytest.raises(EdgeKitError, match="magic number"):
        parse_idx(b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"abc")


def test_idx_rejects_a_non_byte_type():
    with pytest.raises(EdgeKitError, match="type 0x0d"):
        parse_idx(b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + b"abcd")


def test_idx_rejects_truncated_data():
    data = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(EdgeKitError, match=r"truncated: its header promises shape \(4, 28, 28\)"):
        parse_idx(data[:-100])
    with pytest.raises(EdgeKitError, match="IDX header"):
        parse_idx(data[:9])


def test_truncated_gzip_file_is_reported_by_name(tmp_path):
    make_idx_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(EdgeKitError, match="train-images-idx3-ubyte.gz is not a valid gzip file"):
        load_dataset("mnist", data_dir=tmp_path)


def test_images_and_labels_of_different_lengths_are_rejected(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
    with pytest.raises(EdgeKitError, match="20 test images but 7 labels"):
        load_dataset("mnist", data_dir=tmp_path)


# --- CIFAR-10 -------------------------------------------------------------------

def _write_cifar(folder, n=30):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(np.arange(n) % 10)}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)


def test_cifar10_reads_python_batches(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    data = load_dataset("cifar10", data_dir=tmp_path)
    assert data.x_test.shape == (30, 32, 32, 3) and data.labels[0] == "airplane"
    assert len(data.y_train) + len(data.y_val) == 150
    assert data.preprocessing.mean[0] == pytest.approx(0.4914)


def test_cifar10_refuses_a_pickle_that_would_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh)
    with pytest.raises(EdgeKitError, match="not a valid CIFAR-10 batch.*refusing to load builtins.print"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar10_missing_in_data_dir(tmp_path):
    with pytest.raises(EdgeKitError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar10_test_split_needs_only_test_batch(tmp_path):
    """Evaluating needs the official test set alone (issue 38: all five training batches were wanted)."""
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").unlink()
    data = load_dataset("cifar10", data_dir=tmp_path, test_only=True)
    assert data.x_test.shape == (30, 32, 32, 3) and len(data.y_train) == len(data.y_val) == 0
    assert data.y_test.tolist() == [i % 10 for i in range(30)]
    with pytest.raises(EdgeKitError, match=r"lacks CIFAR-10 batches \['data_batch_1'.*needs only test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)  # training needs them


# --- folder ---------------------------------------------------------------------

def _write_folder(root, classes=("cat", "dog", "owl"), per_class=6, mode="L"):
    rng = np.random.default_rng(0)
    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            shape = (20 + j, 24) if mode == "L" else (20 + j, 24, 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            suffix = ".png" if j % 2 else ".jpg"
            Image.fromarray(pixels, mode).save(root / name / f"{j}{suffix}")


def test_folder_dataset_resizes_and_labels_by_subfolder(tmp_path):
    _write_folder(tmp_path)
    data = load_dataset(f"folder:{tmp_path}")
    assert data.labels == ("cat", "dog", "owl")
    assert data.input_shape == (28, 28, 1)
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 18
    assert set(np.unique(data.y_test)) == {0, 1, 2}


def test_folder_dataset_detects_colour_and_takes_a_size(tmp_path):
    _write_folder(tmp_path, mode="RGB")
    data = load_dataset(f"folder:{tmp_path}", image_size=(16, 20))
    assert data.input_shape == (16, 20, 3) and data.x_train.shape[1:] == (16, 20, 3)


@pytest.mark.parametrize("layout, message", [
    ("missing", "is not a directory"),
    ("one_class", "expected at least 2"),
    ("empty_class", "holds no PNG, JPEG, BMP, GIF or WebP"),
    ("corrupt", "cannot read image"),
    ("tiny_class", "has 2 example"),
])
def test_folder_dataset_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        _write_folder(root, classes=("a",) if layout == "one_class" else ("a", "b"))
    if layout == "empty_class":
        (root / "c").mkdir()
    if layout == "corrupt":
        (root / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    if layout == "tiny_class":
        _write_folder(root / "..", classes=("data/c",), per_class=2)
    with pytest.raises(EdgeKitError, match=message):
        load_dataset(f"folder:{root}")


# --- preprocessing --------------------------------------------------------------

def test_preprocessing_round_trips_and_applies_scale_mean_std():
    pre = Preprocessing(size=(32, 32), channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.25))
    again = Preprocessing.from_dict(pre.to_dict())
    assert again == pre
    pixels = np.full((1, 32, 32, 3), 255, np.uint8)
    np.testing.assert_allclose(pre.apply(pixels)[0, 0, 0], [(1 - 0.5) / 0.2, (1 - 0.4) / 0.2, (1 - 0.3) / 0.25],
                               rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"channels": 2}, "channels must be 1 or 3"),
    ({"std": (0.0,)}, "std must be a positive normal number"),
    ({"channels": 3, "mean": (0.1, 0.2)}, "mean needs 1 or 3 values"),
    ({"resize": "fancy"}, "resize must be one of"),
])
def test_preprocessing_rejects_bad_values(kwargs, message):
    with pytest.raises(EdgeKitError, match=message):
        Preprocessing(size=(28, 28), **{"channels": 1, **kwargs})


def test_eval_on_mnist_needs_only_the_two_test_files(exported, tmp_path):
    """evaluating the test split once needed the two train files as well (issue 26)."""
    import json

    from conftest import make_idx_dir, run_module

    arrays = make_idx_dir(tmp_path / "idx")
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (tmp_path / "idx" / name).unlink()
    model = str(exported[0] / "model.int8.tflite")
    result = run_module("runtime", "eval", model, "--dataset", "mnist", "--data-dir", str(tmp_path / "idx"), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["samples"] == len(arrays["t10k-labels-idx1-ubyte"])
    result = run_module("runtime", "eval", model, "--dataset", "mnist", "--data-dir", str(tmp_path / "idx"),
                        "--split", "val")
    assert result.returncode == 2 and "Expected the four IDX files" in result.stderr, result.stderr[-2000:]


def test_a_folder_with_train_and_test_folders_is_split_as_given(tmp_path):
    """torchvision's ImageFolder habit (issue 38): DIR/train/<class>, DIR/test/<class> [DIR/val/<class>] are the
    splits; the classes are train/'s; validation is 10% of train when val/ is missing; eval reads test/ alone."""
    _write_folder(tmp_path / "train", per_class=10)
    _write_folder(tmp_path / "test", classes=("cat", "owl"), per_class=4)  # a test split may lack a class
    data = load_dataset(f"folder:{tmp_path}")
    assert data.labels == ("cat", "dog", "owl")
    assert len(data.y_test) == 8 and set(data.y_test.tolist()) == {0, 2}
    assert len(data.y_train) == 27 and len(data.y_val) == 3 and data.split["method"].startswith("given")
    (tmp_path / "train" / "cat" / "0.jpg").write_bytes(b"not an image")  # eval never opens train/
    only = load_dataset(f"folder:{tmp_path}", test_only=True)
    assert np.array_equal(only.x_test, data.x_test) and len(only.y_train) == 0
    _write_folder(tmp_path / "val", per_class=2)
    (tmp_path / "train" / "cat" / "0.jpg").unlink()
    given = load_dataset(f"folder:{tmp_path}")
    assert (len(given.y_train), len(given.y_val), len(given.y_test)) == (29, 6, 8)
    (tmp_path / "test" / "emu").mkdir()
    (tmp_path / "test" / "emu" / "1.png").write_bytes((tmp_path / "test" / "cat" / "1.png").read_bytes())
    with pytest.raises(EdgeKitError, match="class folders that .*train lacks: emu"):
        load_dataset(f"folder:{tmp_path}")


def test_a_flat_folder_whose_classes_are_called_train_and_test_stays_flat(tmp_path):
    _write_folder(tmp_path, classes=("test", "train"))
    data = load_dataset(f"folder:{tmp_path}")
    assert data.labels == ("test", "train") and data.split["method"] == "stratified"

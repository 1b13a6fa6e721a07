"""Manifests round-trip and catch damage; writes are atomic."""

import json

import pytest

from runtime.errors import EdgeKitError
from runtime.fsutil import atomic_write_bytes, staged_dir
from runtime.artifacts.manifest import REQUIRED_KEYS, read_manifest, verify_files, write_manifest


def _manifest():
    return {"name": "x", "kind": "trained", "model": "fashion_cnn", "dataset": {"name": "digits"},
            "parent": None, "preprocessing": {"size": [28, 28]}, "labels": ["a", "b"],
            "input_shape": [28, 28, 1], "metrics": {"accuracy": 0.5, "size_bytes": 3}}


def test_manifest_round_trip_with_checksums(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"abc")
    written = write_manifest(tmp_path, _manifest(), ["model.keras"])
    read = read_manifest(tmp_path)
    assert read == written
    assert set(REQUIRED_KEYS) <= set(read)
    assert read["files"]["model.keras"] == {
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "bytes": 3}
    assert "numpy" in read["versions"] and read["created"].endswith("+00:00")
    assert verify_files(tmp_path) == []


def test_verify_reports_changed_and_missing_files(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    (tmp_path / "b").write_bytes(b"xyz")
    write_manifest(tmp_path, _manifest(), ["a", "b"])
    (tmp_path / "a").write_bytes(b"abd")
    (tmp_path / "b").unlink()
    assert verify_files(tmp_path) == ["a: sha256 differs from the manifest (file changed or corrupt)", "b: missing"]


@pytest.mark.parametrize("content, message", [
    (None, "holds no manifest.json"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"name": "x"}', "lacks required keys"),
])
def test_read_manifest_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(EdgeKitError, match=message):
        read_manifest(tmp_path)


def test_read_manifest_of_a_file_is_an_error(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"")
    with pytest.raises(EdgeKitError, match="is not a directory"):
        read_manifest(tmp_path / "model.keras")


def test_staged_dir_leaves_nothing_when_interrupted(tmp_path):
    out = tmp_path / "artifact"
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(out) as stage:
            (stage / "model.keras").write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_staged_dir_refuses_a_non_empty_directory_unless_forced(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(EdgeKitError, match="not empty; pass --force"):
        with staged_dir(out):
            pass
    with staged_dir(out, force=True) as stage:
        (stage / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # no staging or trash left


def test_atomic_write_keeps_the_old_file_if_writing_fails(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"ok": True}))

    with pytest.raises(TypeError):
        atomic_write_bytes(path, object())  # fails mid-write
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]

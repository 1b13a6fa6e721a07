"""Atomic file and directory writes.

Every file EdgeKit writes is first written under a temporary name in the same
directory and then renamed over its final name (`os.replace` is atomic on POSIX),
and an artifact directory is built in a sibling staging directory that is renamed
into place only when complete. An interrupted run therefore never leaves a
half-written file or directory under a name that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from runtime.errors import EdgeKitError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to replace a non-empty directory unless `force`; refuse a file outright."""
    if out.exists() and not out.is_dir():
        raise EdgeKitError(f"output path {out} is a file; expected a directory. Choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise EdgeKitError(
            f"output directory {out} is not empty; pass --force to replace it, or choose another --out."
        )


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory that replaces `out` only if the block succeeds.

    The staging directory sits next to `out` (same filesystem, so the final rename
    is atomic) and is removed if the block raises or is interrupted.
    """
    out = Path(out)
    check_output_dir(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise EdgeKitError(f"cannot create output directory next to {out}: {exc.strerror}.") from None
    try:
        yield stage
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(stage, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def held_output():
    """Hold what C/C++ code writes to stdout and stderr inside the block (TensorFlow's start-up lines,
    the TFLite converter's `fully_quantize: ...`), and give it back only if the block fails, so a
    failure keeps its diagnostics."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as held:
        for fd in saved:
            os.dup2(held.fileno(), fd)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            if failed:
                held.seek(0)
                os.write(2, held.read())

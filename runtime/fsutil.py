"""Writing files and directories: atomic, with the user's umask, under a lock, never half-done.

Every file EdgeKit writes is first written under a temporary name in the same directory
(`.<name>.tmp-XXXX`) and then renamed over its final name (`os.replace` is atomic on POSIX),
and an artifact directory is built in a sibling staging directory that is renamed into place
only when complete. An interrupted run therefore never leaves a half-written file or directory
under a name that looks finished, and the next run on that directory removes what a killed run
left (`remove_stale`). Files and directories get the modes the user's umask gives any other
tool's output (`tempfile` would make them 0600 and 0700). A run takes an advisory lock on its
output directory (`output_lock`), so two runs on one directory cannot interleave. A write that
fails (a full disk) raises WriteFailed (exit 1) and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from runtime.errors import Busy, EdgeKitError, WriteFailed

TMP = ".tmp-"  # every temporary name holds it: .<final name>.tmp-XXXXXXXX
OLD = ".old-"  # a replaced directory, on its way out
LOCK_SUFFIX = ".lock"
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def umask() -> int:
    """The process umask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def write_error(path, exc: OSError) -> EdgeKitError:
    """The one-line error for a failed write: a full disk is the work failing (exit 1, free space); a read-only,
    forbidden or missing output directory, wherever it is found, is the user's choice of it (exit 2, choose
    another)."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR):
        why = {errno.EROFS: "the file system is read-only", errno.ENOENT: "its directory does not exist",
               errno.ENOTDIR: "a part of its path is not a directory"}.get(exc.errno, "permission denied")
        return EdgeKitError(f"cannot write {path}: {why}; nothing was left half-written. Choose an output directory "
                            "you can write (--out), then run the command again.")
    reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
    return WriteFailed(f"cannot write {path}: {reason}; nothing was left half-written. Free space or choose "
                       "another output directory, then run the command again.")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def temp_file(directory: str | os.PathLike, name: str, suffix: str = "") -> tuple[int, str]:
    """(fd, path) of a new temporary file for `name` in `directory`, with the umask's mode."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}{TMP}", suffix=suffix, dir=directory)
    os.fchmod(fd, file_mode())
    return fd, tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = None
    try:
        fd, tmp = temp_file(path.parent, path.name)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def is_temporary(name: str) -> bool:
    return name.startswith(".") and (TMP in name or OLD in name)


def remove_stale(directory: str | os.PathLike) -> list[str]:
    """Remove what killed runs left: temporaries inside `directory` and its staging siblings.

    Call it only while holding `output_lock(directory)`, so no live run's files are touched.
    """
    directory = Path(directory)
    removed = []
    candidates = []
    if directory.is_dir():
        candidates += [p for p in directory.iterdir() if is_temporary(p.name)]
    if directory.parent.is_dir():
        candidates += [p for p in directory.parent.iterdir()
                       if p.name.startswith(f".{directory.name}{TMP}") or p.name.startswith(f".{directory.name}{OLD}")]
    for path in candidates:
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
    return removed


_HELD: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth): re-entrant within one process


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Hold the advisory lock of an output directory (`.<name>.lock` beside it) for the block.

    A second run on the same directory is refused at once (Busy, exit 1) instead of redoing the
    work beside the first. The lock dies with its process (kill -9 included). Stale temporaries are
    removed on taking it.
    """
    directory = Path(directory).absolute()
    lock = str(directory.parent / f".{directory.name}{LOCK_SUFFIX}")
    if lock in _HELD:
        fd, depth = _HELD[lock]
        _HELD[lock] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _HELD[lock]
            _HELD[lock] = (fd, depth - 1)
        return
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(directory.parent, exc) from exc
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError as exc:
            raise write_error(lock, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(f"another EdgeKit run is writing {directory} (it holds {lock}); wait for it to finish, "
                       "or choose another output directory.") from None
        try:  # the file we locked may have been removed by the run that released it: lock the new one
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    _HELD[lock] = (fd, 1)
    try:
        remove_stale(directory)
        yield
    finally:
        _HELD.pop(lock, None)
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still held, so no one can take the old file after us
        os.close(fd)


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to replace a non-empty directory unless `force`; refuse a file outright."""
    if out.exists() and not out.is_dir():
        raise EdgeKitError(f"output path {out} is a file; expected a directory. Choose another --out.")
    if out.is_dir() and any(not is_temporary(p.name) for p in out.iterdir()) and not force:
        raise EdgeKitError(
            f"output directory {out} is not empty; pass --force to replace it, or choose another --out."
        )


def _is_write_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory that replaces `out` only if the block succeeds.

    The staging directory sits next to `out` (same filesystem, so the final rename is atomic),
    has the umask's mode, and is removed if the block raises or is interrupted. The block runs
    under `output_lock(out)`. An OSError of a failed write becomes WriteFailed.
    """
    out = Path(out)
    with output_lock(out):
        check_output_dir(out, force)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP}", dir=out.parent))
            os.chmod(stage, dir_mode())
        except OSError as exc:
            raise write_error(out.parent, exc) from exc
        try:
            try:
                yield stage
            except OSError as exc:
                if _is_write_error(exc):
                    raise write_error(out, exc) from exc
                raise
            except Exception as exc:  # Keras and h5py wrap OSError in their own types
                cause = exc.__cause__ or exc.__context__
                if _is_write_error(cause) or "No space left" in str(exc):
                    raise write_error(out, cause if isinstance(cause, OSError) else OSError(errno.ENOSPC, "")) \
                        from exc
                raise
            try:
                if out.exists():
                    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}{OLD}", dir=out.parent))
                    os.replace(out, trash / out.name)
                    os.replace(stage, out)
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    os.replace(stage, out)
            except OSError as exc:
                raise write_error(out, exc) from exc
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


def check_readable_file(path: str | Path, what: str = "file") -> os.stat_result:
    """The stat of a regular, readable file, or an error that says what the path actually is."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise EdgeKitError(f"{what} {path} is a symbolic link to {os.readlink(path)}, which does not exist.") \
                from None
        raise EdgeKitError(f"{what} {path} does not exist.") from None
    except OSError as exc:  # ELOOP, EACCES on a parent directory, ENAMETOOLONG
        raise EdgeKitError(f"cannot open {what} {path}: {exc.strerror}.") from None
    if stat.S_ISDIR(info.st_mode):
        raise EdgeKitError(f"{what} {path} is a directory; expected a file.")
    if not stat.S_ISREG(info.st_mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode)
                else "a device")
        raise EdgeKitError(f"{what} {path} is {kind}, not a regular file; expected a file on disk.")
    if not os.access(path, os.R_OK):
        raise EdgeKitError(f"{what} {path} is not readable (permission denied); check its permissions "
                           f"(ls -l {path}).")
    return info


def relative(path, root: Path) -> str | None:
    """`path` relative to `root` (a report's paths, written relative to its directory), or None for None."""
    if path is None:
        return None
    try:
        return os.path.relpath(path, root)
    except ValueError:  # another drive (Windows)
        return str(path)

"""Fetching a dataset file once, atomically, into the Keras cache."""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from runtime.errors import EdgeKitError

TIMEOUT_S = 30


def fetch(url: str, dest: Path, what: str) -> Path:
    """Download `url` to `dest` (temporary name, then rename); EdgeKitError when offline."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            while block := response.read(1 << 20):
                out.write(block)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EdgeKitError(f"could not download {what} from {url} ({reason})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest

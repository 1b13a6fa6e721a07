"""Class names: a labels file, labels given in code, or the label file packed in a TFLite model's metadata,
each checked (one name per output, each once, no bytes) before a prediction is named by it."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

from runtime.errors import EdgeKitError
from runtime.fsutil import check_readable_file
from runtime.text import terminal

MAX_LABELS_BYTES = 4 << 20
# a model's packed label files (TFLite metadata's zip): members listed, text members read, inflated bytes in all
MAX_PACKED_MEMBERS, MAX_PACKED_TEXTS, MAX_PACKED_BYTES = 100, 8, 8 << 20


def parse_labels(text: str, source: str) -> list[str]:
    """One label a line, optionally after its index ("0 matured" or "0: matured", as model zoos write them);
    blank lines are skipped. Indices, when every line has one, must run 0, 1, 2, ..."""
    # lines end at "\n" alone (str.splitlines would also split at U+2028, \x1c, \x85: one label in two)
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    split = [line.split(None, 1) if line.split(None, 1)[0].rstrip(":").isdigit() and len(line.split(None, 1)) == 2
             else None for line in lines]
    if lines and all(split):
        indices = [int(first.rstrip(":")) for first, _ in split]
        if indices != list(range(len(lines))):
            raise EdgeKitError(f"{source}: the leading indices run {indices[:5]}...; expected 0, 1, 2, ... one label "
                               "a line, in output order.")
        lines = [rest.strip() for _, rest in split]
    return check_labels(lines, source)


def check_labels(labels, source: str) -> list[str]:
    """`labels` if they are distinct strings: a repeated name would give the first one's index for a later
    class (a silently wrong answer), bytes would become their code points."""
    if isinstance(labels, (str, bytes, bytearray)) or not isinstance(labels, (list, tuple)) \
            or not all(isinstance(v, str) for v in labels):
        raise EdgeKitError(f"{source}: expected a list of label strings, one per output; got "
                           f"{type(labels).__name__}.")
    seen = {}
    for i, label in enumerate(labels):
        if label in seen:
            raise EdgeKitError(f"{source}: label {terminal(label)!r} is given twice (outputs {seen[label]} and {i}); "
                               "expected one distinct name per output.")
        seen[label] = i
    return list(labels)


def read_labels(path: str | Path) -> list[str]:
    """A labels file (`parse_labels`), read with its size bounded and its encoding checked."""
    size = check_readable_file(path, "labels file").st_size
    if size > MAX_LABELS_BYTES:
        raise EdgeKitError(f"labels file {path} has {size:,} bytes; expected a text file of one label a line "
                           f"(at most {MAX_LABELS_BYTES >> 20} MB).")
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EdgeKitError(f"labels file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); expected one "
                           "label a line.") from None
    labels = parse_labels(text, f"labels file {path}")
    if not labels:
        raise EdgeKitError(f"labels file {path} holds no labels; expected one label a line.")
    return labels


def packed_labels(path: Path, lines: int | None) -> list[str] | None:
    """The label file TFLite Support's MetadataPopulator packs into a model: associated files are a zip
    archive appended to the flatbuffer. The label file is the text member with one line per output
    (named like labels*.txt when there are several); `lines`: the outputs it must name (None: the first that
    parses)."""

    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as packed:
            members = [m for m in packed.infolist()[:MAX_PACKED_MEMBERS]
                       if m.filename.lower().endswith(".txt") and m.file_size <= MAX_LABELS_BYTES]
            members.sort(key=lambda m: "label" not in m.filename.lower())
            budget = MAX_PACKED_BYTES  # inflated bytes read over all members: the sizes in a zip may lie
            for member in members[:MAX_PACKED_TEXTS]:
                with packed.open(member) as fh:  # read(n) inflates at most n bytes, whatever the header says
                    data = fh.read(min(MAX_LABELS_BYTES, budget) + 1)
                budget -= len(data)
                if len(data) > MAX_LABELS_BYTES or budget < 0:
                    return None
                if lines is not None and data.count(b"\n") + 1 < lines:  # too few lines for this model
                    continue
                try:
                    labels = parse_labels(data.decode("utf-8-sig"), member.filename)
                except (EdgeKitError, UnicodeDecodeError):
                    continue
                if lines is None or len(labels) == lines:
                    return labels
    except (OSError, zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, zlib.error):
        return None
    return None



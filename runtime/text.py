"""Text that came from outside (a model file's labels, a labels file, search.json, a study database, a URL, a
device), made safe for where it is printed: a terminal, a Markdown report, a spreadsheet cell, or a line that names
a storage URL.

A label carrying `ESC ] 8 ;;` (an OSC hyperlink) or `ESC [ 2 J` (clear screen) would act on the user's
terminal; a recipe of `# HEADING` or `![x](http://...)` would become a report's heading or a beacon image.
"""

from __future__ import annotations

import re
import unicodedata

# C0 and C1 controls, DEL, and the format characters that reorder or hide text (bidi overrides, zero width)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
# what gives Markdown (CommonMark, GitHub's tables) or HTML meaning anywhere in a line: emphasis, code, links and
# images, headings, table cells, tags and entities; "_" inside a word (fashion_cnn) means nothing and stays
_MARKDOWN = re.compile(r"([\\`*\[\]<>#!|&~$]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z]))")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal(text) -> str:
    """`text` with every control and invisible format character shown as an escape (\\x1b), never sent raw."""
    return _CONTROL.sub(_escape, str(text))


def markdown(text) -> str:
    """`text` as literal Markdown: controls escaped, every character Markdown or HTML gives meaning backslashed
    (so `# x` stays text, `![a](b)` is no image, `<script>` no tag), on one line."""
    return _MARKDOWN.sub(r"\\\1", terminal(unicodedata.normalize("NFC", str(text))))


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet(value):
    """A CSV cell that a spreadsheet shows as text, never runs: a string starting with =, +, -, @, tab or CR gets
    a leading ' (OWASP's CSV injection rule), unless it is a plain number ("-0.5"). Numbers, None and the rest pass
    as they are."""
    if not isinstance(value, str) or not value.startswith(_FORMULA):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def public_url(url: str) -> str:
    """A storage URL with its password masked (`postgresql://user:***@host/db`), fit to print or write."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses (or no SQLAlchemy): mask anything between ':' and '@'
        return re.sub(r"(//[^/:@]*:)[^@/]*@", r"\1***@", str(url))

"""User-facing errors: the CLI prints these as one line (no traceback) and exits non-zero.

Three helpers keep those lines short and exact: `shorten` and `clip` cut a value echoed into a message (a
50 MB field must not become a 50 MB error line), and `decode_utf8` turns bytes that are not UTF-8
into `file:line: not UTF-8 at byte N` instead of a UnicodeDecodeError.
"""

from __future__ import annotations


class R4BError(Exception):
    """An error whose message says where and what went wrong, and the fix."""


# Longest repr of a value echoed into an error message.
MAX_SHOWN_CHARS = 80


def clip(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """`text` cut to `limit` characters, with the full length said when cut."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def shorten(value: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """repr(value), clipped to `limit` characters with the full length said."""
    return clip(repr(value), limit)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def decode_utf8(data: bytes, source: str) -> str:
    """`data` as text; R4BError `source:line: not UTF-8 at byte N` when it is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        # The byte is counted from 0 as hex dumps show it; the column from 1 as editors do.
        raise R4BError(f"{source}:{line}: not UTF-8 at byte {exc.start} (0x{data[exc.start]:02x}, column "
                       f"{exc.start - line_start + 1}); save the file as UTF-8") from None

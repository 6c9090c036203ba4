"""User-facing error text: every error the library prints or raises is one line."""
from __future__ import annotations

import os


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` with all whitespace runs (newlines included) folded to single spaces, cut to ``limit`` chars."""
    folded = " ".join(str(text).split())
    return folded if limit is None else folded[:limit]


def shown(name: object) -> str:
    """A file name (or key) as a message prints it: control and other unprintable characters escaped as Python
    writes them (``\\n``, ``\\x1b``, ``\\udcff`` for an undecodable byte), so that a name can neither break the
    one-line rule nor drive the terminal, and reads back unambiguously. Printable names come back unchanged."""
    text = os.fspath(name) if isinstance(name, os.PathLike) else str(name)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)

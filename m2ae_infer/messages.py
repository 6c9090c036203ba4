"""User-facing error text: every error the library prints or raises is one line."""


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` with all whitespace runs (newlines included) folded to single spaces, cut to ``limit`` chars."""
    folded = " ".join(str(text).split())
    return folded if limit is None else folded[:limit]


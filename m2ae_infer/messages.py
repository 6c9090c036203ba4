"""User-facing error text: every error the library prints or raises is one line."""
import argparse


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` with all whitespace runs (newlines included) folded to single spaces, cut to ``limit`` chars."""
    folded = " ".join(str(text).split())
    return folded if limit is None else folded[:limit]


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit code 2) like every other error of the CLIs, not the
    whole usage block followed by the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")

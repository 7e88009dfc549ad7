"""The command-line tools' argument parser and the argument types they share."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class CommandParser(argparse.ArgumentParser):
    """argparse with the tools' error format: one line ``prog: error: message (see prog --help)``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print the one-line error and exit 2 (argparse would print the whole usage first)."""
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _int_at_least(minimum: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {value}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    return _int_at_least(1, text)


def non_negative_int(text: str) -> int:
    """A whole number >= 0."""
    return _int_at_least(0, text)

"""The command-line tools' argument parser and the argument types they share."""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Iterable, NoReturn

if TYPE_CHECKING:
    from nnalign.runs import Setting


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


def add_setting_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, settings: Iterable[Setting]) -> None:
    """One option per declared setting (:class:`nnalign.runs.Setting`): a switch for a ``bool``, a value otherwise
    (default None: the setting's own default, which may be the anchor's)."""
    for s in settings:
        if s.kind is bool:
            parser.add_argument(s.flag, action="store_true", help=s.help)
            continue
        kwargs = {"choices": s.choices, "default": s.default} if s.choices else {"metavar": s.metavar}
        value_type = non_negative_int if s.kind is int else s.kind
        parser.add_argument(s.flag, type=value_type, help=s.help, **kwargs)


def setting_values(args: argparse.Namespace, settings: Iterable[Setting]) -> dict:
    """The declared settings' values from parsed arguments (None: not given, i.e. the default)."""
    values = {}
    for s in settings:
        given = getattr(args, s.dest)
        values[s.name] = (not s.default if given else None) if s.kind is bool else given
    return values

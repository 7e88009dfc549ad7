"""User-facing errors: one line that names the file and the problem, a non-zero exit, no traceback."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable


MAX_LINE = 300


class NnalignError(Exception):
    """A problem with the user's input or setup, reported as one line without a traceback."""


class CaseError(NnalignError):
    """One case that cannot be processed (read, scored, predicted); the message is one line naming the case or its
    files. Commands report it and go on with the other cases."""


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (line breaks and runs of spaces become one space), at most
    :data:`MAX_LINE` characters; the exception's type name when it has no message."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."


def cli_entry(prog: str) -> Callable[[Callable[[], int | None]], Callable[[], None]]:
    """Wrap a console-script ``main``: print ``prog: error: message`` for :class:`NnalignError` and exit 1.

    Set ``NNALIGN_DEBUG=1`` to see the traceback instead.
    """

    def decorate(main: Callable[[], int | None]) -> Callable[[], None]:
        @functools.wraps(main)
        def wrapped() -> None:
            try:
                code = main()
            except NnalignError as e:
                if os.environ.get("NNALIGN_DEBUG"):
                    raise
                print(f"{prog}: error: {e}", file=sys.stderr)
                sys.exit(1)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                sys.exit(130)
            sys.exit(code or 0)

        return wrapped

    return decorate

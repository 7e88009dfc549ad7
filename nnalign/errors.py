"""User-facing errors: one line that names the file and the problem, a non-zero exit, no traceback."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable


class NnalignError(Exception):
    """A problem with the user's input or setup, reported as one line without a traceback."""


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

"""Messages for the user that must not be lost and must not repeat."""
from __future__ import annotations

import sys

_said = set()


class RunFailure(Exception):
    """A failure while running (not bad input): the scripts print its one-line message and exit
    with status 1 (bad input exits with 2)."""


def warn_once(key: str, message: str) -> None:
    """Print `warning: message` on stderr the first time `key` is seen in this process (rank 0
    only under torchrun), so a fallback taken in every layer or every epoch is said once."""
    if key in _said:
        return
    _said.add(key)
    from .distributed import is_main
    if is_main():
        print(f"warning: {message}", file=sys.stderr, flush=True)

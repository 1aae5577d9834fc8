"""Messages for the user that must not be lost and must not repeat."""
from __future__ import annotations

import os
import sys
import time

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


PAUSE_ENV = "HESSIAN_PRUNING_PAUSE_AT"


def pause_point(name: str) -> None:
    """Test hook: when the environment variable HESSIAN_PRUNING_PAUSE_AT equals `name`, say
    `paused at <name>` on stderr and wait (up to a minute), so a test can interrupt the run at
    that known moment. Does nothing otherwise."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    print(f"paused at {name}", file=sys.stderr, flush=True)
    time.sleep(60)

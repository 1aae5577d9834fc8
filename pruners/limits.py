"""The per-layer pruning cap, in one place: no layer loses more than `--max_pruning_ratio` of
its original channels (directions, dims, heads), and every layer keeps at least one."""
from __future__ import annotations

import math

# (1 - 0.95) * 20 is 1.0000000000000009 in floating point; a product this close to an integer
# is that integer, so the cap keeps 1 channel there, not 2.
_SLACK = 1e-9


def min_kept(original: int, max_pruning_ratio: float) -> int:
    """Fewest of `original` units a layer may keep: ceil((1 - max_pruning_ratio) * original),
    read with a tolerance for float error, and at least 1."""
    exact = (1.0 - max_pruning_ratio) * original
    return max(1, math.ceil(exact - _SLACK * max(1.0, abs(exact))))

"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable


def time_blocks(step: Callable[[], None], steps: int, repeats: int) -> list[float]:
    """Seconds per step of ``repeats`` consecutive blocks of ``steps`` calls of ``step``."""
    blocks = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        blocks.append((time.perf_counter() - start) / steps)
    return blocks

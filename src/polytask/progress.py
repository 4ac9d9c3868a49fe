"""Progress of long loops (training epochs, evaluations).

On a terminal a tqdm bar shows the progress over the loop's steps. When stderr is not a
terminal (a log file, a batch job), a bar would write unreadable carriage returns, so a
one-line message is logged every ``interval`` seconds instead; a loop shorter than that
logs nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

__all__ = ["Progress", "ProgressFactory"]


class Progress:
    """Progress over ``total`` steps, as a bar on a terminal or as periodic log lines.

    Args:
        total: the number of steps of the loop.
        desc: what the loop is (``"epoch 3/10"``, ``"val evaluation"``).
        enabled: show anything at all.
        log: where the periodic lines go when stderr is not a terminal (``None``: nowhere).
        initial: steps already done (a resumed epoch).
        interval: seconds between two log lines.
        terminal: whether to draw a bar; default: whether stderr is a terminal.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        enabled: bool = True,
        log: Callable[[str], None] | None = None,
        initial: int = 0,
        interval: float = 30.0,
        terminal: bool | None = None,
    ) -> None:
        if terminal is None:
            terminal = sys.stderr.isatty()
        self.total = total
        self.desc = desc
        self.done = initial
        self._initial = initial
        self._interval = interval
        self._log = log if enabled and not terminal else None
        self._bar: Any = None
        if enabled and terminal:
            self._bar = tqdm(
                total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True
            )
        self._start = time.monotonic()
        self._last = self._start

    def update(self, n: int = 1) -> None:
        """``n`` more steps are done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        if self._log is not None:
            now = time.monotonic()
            if now - self._last >= self._interval:
                self._last = now
                self._log(self.line(now - self._start))

    def line(self, elapsed: float) -> str:
        """The log line after ``elapsed`` seconds: steps, percentage, time, rate and time left."""
        done_here = self.done - self._initial
        left = self.total - self.done
        text = f"{self.desc}: step {self.done}/{self.total}"
        if self.total:
            text += f" ({100.0 * self.done / self.total:.0f} %)"
        text += f", {elapsed:.0f} s"
        if done_here > 0 and elapsed > 0:
            rate = done_here / elapsed
            text += f", {rate:.3g} steps/s" if rate >= 1 else f", {1 / rate:.3g} s/step"
        if done_here > 0 and left > 0:
            text += f", about {elapsed / done_here * left:.0f} s left"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


ProgressFactory = Callable[[int, str], Progress]
"""``factory(total, desc) -> Progress``: how a caller wants a loop's progress shown."""

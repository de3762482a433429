"""Progress reporting: a callback (for the Space's progress bar) plus a tqdm bar (for the CLI)."""
from __future__ import annotations

import logging
from typing import Callable

from tqdm.auto import tqdm

ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)

logger = logging.getLogger(__name__)


class Progress:
    """Forwards `update(stage, done, total)` to an optional callback and to one tqdm bar per stage."""

    def __init__(self, callback: ProgressCallback | None = None, bars: bool = False, unit: str = "layer") -> None:
        self.callback = callback
        self.bars = bars
        self.unit = unit
        self._bar: tqdm | None = None
        self._stage: str | None = None

    def update(self, stage: str, done: int, total: int) -> None:
        if self.callback is not None:
            self.callback(stage, done, total)
        logger.debug("%s %d/%d", stage, done, total)
        if not self.bars:
            return
        if stage != self._stage:
            self.close()
            self._bar = tqdm(total=total, desc=stage, unit=self.unit, leave=True)
            self._stage = stage
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._stage = None, None

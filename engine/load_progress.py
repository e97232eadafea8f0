"""Weight-loading progress of one rank: the model calls `update(1)` per decoder layer read.

It moves the rank's tqdm bar and, when the executor passed a `report(done, total)` callback,
tells it too: executors wait for a slow rank as long as it keeps reading layers, and name the
layer it stopped at when it does not (engine.executor.startup).
"""

from __future__ import annotations

from typing import Callable

Report = Callable[[int, int], None]


class LoadProgress:
    def __init__(self, bar, total: int, report: Report | None = None):
        self.bar, self.total, self.report, self.done = bar, total, report, 0
        if report is not None:
            report(0, total)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        if self.report is not None:
            self.report(self.done, self.total)

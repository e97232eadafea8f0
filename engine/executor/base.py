"""The executor interface: how the driver runs one step on every rank of a model.

In-process (`uni`), spawned processes (`mp`), torchrun's ranks (`external`) and Ray actors
(`launch.ray_executor`, found through the `qshard.executors` entry point) all implement it.

Failure contract: a rank that dies or fails makes `execute` raise `WorkerFailure` naming the
rank (within 30 s for a dead process), after which the executor has stopped every other rank.

Interrupt contract: SIGINT/SIGTERM to the driver alone stop every rank the executor owns and
the driver unwinds (KeyboardInterrupt / SystemExit(128 + signum)) within seconds, wherever its
main thread is blocked (engine.executor.interrupt); the executor is broken afterwards.

Start-up contract: an executor waits for its ranks as long as they make progress (layers read,
reported through `Worker(on_progress=...)`), and fails naming a rank that exits or that made
no progress for dist_timeout_s (engine.executor.startup).
"""

from __future__ import annotations

import abc
import os

from engine.engine_config import EngineConfig
from engine.step import PendingOutput, StepInput, StepOutput
from kernels.errors import QShardError


class WorkerFailure(QShardError, RuntimeError):
    """A rank died or stopped answering; the message names it (`ranks` lists them when known)."""

    def __init__(self, message: str, ranks: list[int] | None = None):
        super().__init__(message)
        self.ranks = list(ranks or [])


class Executor(abc.ABC):
    #: True when this process only follows rank 0's steps (SPMD ranks > 0 under torchrun)
    is_follower: bool = False
    #: model steps run so far (control steps not counted); benchmarks divide by it
    steps_run: int = 0

    def __init__(self, config: EngineConfig):
        self.config = config
        self.steps_run = 0

    #: whether steps may be launched before the previous step's tokens are read (async scheduling:
    #: the tokens are fed back on rank 0's device, so only an executor of one in-process rank can)
    can_overlap: bool = False

    @abc.abstractmethod
    def execute(self, step: StepInput) -> StepOutput:
        """Run one step on every rank; return rank 0's output."""

    def launch(self, step: StepInput) -> PendingOutput:
        """Start one step on every rank; its output comes from the PendingOutput (default: run it now)."""
        return PendingOutput(self.execute(step))

    @property
    def overlaps_by_default(self) -> bool:
        """Whether async scheduling is on when the engine config leaves it unset."""
        return False

    def end_of_call(self, results: list[list[int]]) -> list[list[int]]:
        """Called by the driver when a generate() call is over (SPMD followers sync here)."""
        return results

    def follow(self) -> list[list[int]]:
        raise NotImplementedError(f"{type(self).__name__} has no follower ranks")

    @abc.abstractmethod
    def shutdown(self) -> None: ...

    def collect_stats(self, reset: bool = False) -> list[dict]:
        """Every rank's statistics (engine.executor.stats.rank_stats), rank order. With reset,
        start a new measuring window (and switch the collectives timer on)."""
        raise NotImplementedError(f"{type(self).__name__} does not collect statistics")

    def rank_pids(self) -> dict[int, int]:
        """Process id of each rank (tests kill one to check failure handling)."""
        return {0: os.getpid()}

    def _count(self, step: StepInput) -> None:
        if step.seq_ids:
            self.steps_run += 1

    @property
    def weight_bytes_read(self) -> int:
        return 0

"""Everything in this process: tensor-parallel size 1."""

from __future__ import annotations

from engine.engine_config import EngineConfig
from engine.executor.base import Executor
from engine.executor.stats import gather_stats
from engine.step import PendingOutput, StepInput, StepOutput
from engine.worker import Worker
from parallel.state import single_process


class UniExecutor(Executor):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
        if config.tensor_parallel_size != 1:
            raise ValueError(f"the uni executor runs tensor_parallel_size=1 only, got {config.tensor_parallel_size}")
        self.worker = Worker(config, single_process(config.rank_device(0)))

    can_overlap = True

    def execute(self, step: StepInput) -> StepOutput:
        self._count(step)
        return self.worker.execute(step)

    def launch(self, step: StepInput) -> PendingOutput:
        self._count(step)
        return self.worker.launch(step)

    @property
    def overlaps_by_default(self) -> bool:
        # on CUDA the host's loop then runs while the GPU computes; on CPU there is nothing to overlap
        return self.worker.ctx.device.type == "cuda"

    def collect_stats(self, reset: bool = False) -> list[dict]:
        return gather_stats(self.worker.ctx, reset, self.worker.weight_bytes_read)

    def shutdown(self) -> None:
        self.worker = None

    @property
    def weight_bytes_read(self) -> int:
        return self.worker.weight_bytes_read if self.worker else 0

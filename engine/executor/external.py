"""SPMD under an external launcher (torchrun): every rank runs the same program.

Rank 0 drives (tokenizes, schedules, samples) and broadcasts each step; ranks > 0 follow inside
their own `generate()` call and, when rank 0's call ends, receive its token ids so that every
rank returns the same outputs.

Failures: torchrun's agent stops every rank when one exits; before that, the surviving ranks'
collectives fail (a dead peer closes its sockets) and `WorkerFailure` names the rank that went
away, found through `PeerWatch` heartbeats and pids in torchrun's store. After a failure no
collective is attempted again (shutdown would otherwise wait on a broken group).

SIGINT to a rank (rank 0 alone, say) marks its engine broken (engine.executor.interrupt) before
the KeyboardInterrupt unwinds it, so that shutdown sends no STOP into a group whose other ranks
are still inside a step; the launcher then leaves at once, torchrun's agent sees the exit and
stops the rest, whose collectives fail against the gone rank. A rank whose main thread is still
inside a collective INTERRUPT_GRACE_S after the SIGINT (a gloo wait that never returns to the
interpreter, as seen with mp before its followers were killed) leaves by os._exit(130): under
torchrun nothing in this process outlives the engine's group anyway. SIGTERM stays the launcher's
(launch.torchrun: the agent stopping the survivors of a failure).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import traceback

import torch
import torch.distributed as dist

from engine.engine_config import EngineConfig
from engine.executor.base import Executor, WorkerFailure
from engine.executor.interrupt import InterruptGuard
from engine.executor.mp import share_cpu_threads
from engine.executor.peers import PeerWatch
from engine.executor.stats import gather_stats
from engine.step import END_OF_CALL, STOP, StepInput, StepOutput
from engine.worker import Worker
from parallel.collectives import broadcast_int64
from parallel.state import context_from_default_group, init_process_group

logger = logging.getLogger(__name__)

INTERRUPT_GRACE_S = 2.0


class ExternalExecutor(Executor):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.worker = None
        self.broken = False
        self._busy = 0  # > 0 while the main thread is inside a call that runs collectives
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if world != config.tensor_parallel_size:
            raise ValueError(f"torchrun started {world} ranks but tensor_parallel_size is "
                             f"{config.tensor_parallel_size}; they must match")
        if config.device == "cuda" and local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} needs GPU {local_rank} but this node has "
                             f"{torch.cuda.device_count()} GPUs: start fewer ranks per node (--nproc-per-node)")
        device = config.rank_device(local_rank)
        if config.device == "cpu":
            share_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        if dist.is_initialized():
            self.ctx = context_from_default_group(device, config.dist_timeout_s)
        else:
            self.ctx = init_process_group(rank, world, "env://", device, config.dist_timeout_s)
        self.is_follower = self.ctx.rank != 0
        self.watch = PeerWatch.from_env(self.ctx.rank, self.ctx.world_size) if world > 1 else None
        self.interrupt = InterruptGuard(self._on_interrupt, "engine", signals=(signal.SIGINT,)).install()
        try:
            self.worker = Worker(config, self.ctx)
        except BaseException:
            self.interrupt.restore()
            raise

    def _on_interrupt(self, signum: int) -> None:
        self.broken = True
        timer = threading.Timer(INTERRUPT_GRACE_S, self._leave_if_stuck, args=(signum,))
        timer.daemon = True
        timer.start()

    def _leave_if_stuck(self, signum: int) -> None:
        if self._busy:
            logger.warning("rank %d: still inside a collective %.0f s after %s: leaving now", self.ctx.rank,
                           INTERRUPT_GRACE_S, signal.Signals(signum).name)
            logging.shutdown()
            os._exit(128 + signum)

    @contextlib.contextmanager
    def _collective(self):
        """Around every call that enters collectives: a failure names the rank that went away,
        unless an interrupt caused it."""
        self._busy += 1
        try:
            yield
        except WorkerFailure:
            raise
        except Exception as e:
            self.interrupt.raise_now()
            raise self._failure(e) from e
        finally:
            self._busy -= 1

    # -- failures -------------------------------------------------------------------------------

    def _check(self) -> None:
        if self.interrupt.received is not None:
            raise WorkerFailure("this engine was stopped by an interrupt (SIGINT)")
        if self.broken or self.worker is None:
            raise WorkerFailure("this engine's process group broke in an earlier failure")

    def _failure(self, error: BaseException) -> WorkerFailure:
        """Name the rank(s) that went away (or reported an error) after a collective failed."""
        self.broken = True
        me = self.ctx.rank
        if self.watch is None:
            return WorkerFailure(f"rank {me}: a collective failed ({type(error).__name__}: {error})")
        self.watch.report_error(f"rank {me}: {type(error).__name__}: {error}\n{traceback.format_exc()}")
        gone, errors = self.watch.diagnose()
        if gone:
            names = "; ".join(f"rank {r} ({why})" for r, why in gone)
            return WorkerFailure(f"{names} died; rank {me} stops", [r for r, _ in gone])
        if errors:
            r, text = min(errors.items())
            return WorkerFailure(f"rank {r} failed: {text.splitlines()[0]}; rank {me} stops", [r])
        return WorkerFailure(f"rank {me}: a collective failed ({type(error).__name__}: {error}) and no peer "
                             f"was found gone", [])

    def report_error(self, error: BaseException) -> None:
        """Leave this rank's error where the others' diagnosis finds it (the launcher calls this)."""
        if self.watch is not None and not isinstance(error, WorkerFailure):
            self.watch.report_error(f"rank {self.ctx.rank}: {type(error).__name__}: {error}\n"
                                    f"{traceback.format_exc()}")

    # -- steps ----------------------------------------------------------------------------------

    def execute(self, step: StepInput) -> StepOutput:
        self._check()
        self._count(step)
        with self._collective():
            broadcast_int64(step.encode(), self.ctx)
            return self.worker.execute(step)

    def end_of_call(self, results: list[list[int]]) -> list[list[int]]:
        self._check()
        with self._collective():
            broadcast_int64(StepInput.control(END_OF_CALL).encode(), self.ctx)
            broadcast_int64(_encode_results(results), self.ctx)
        return results

    def follow(self) -> list[list[int]]:
        """Run rank 0's steps until its generate() call ends; return its token ids."""
        self._check()
        with self._collective():
            while True:
                step = StepInput.decode(broadcast_int64(None, self.ctx))
                if step.flags & STOP:
                    raise WorkerFailure("rank 0 shut the engine down while this rank was generating", [0])
                if step.flags & END_OF_CALL:
                    return _decode_results(broadcast_int64(None, self.ctx))
                self._count(step)
                self.worker.execute(step)

    def follow_until_stop(self) -> None:
        """A server's follower ranks: run rank 0's steps until it shuts the engine down (its
        calls never end, so END_OF_CALL never comes). Shutdown has nothing left to wait for."""
        self._check()
        with self._collective():
            while True:
                step = StepInput.decode(broadcast_int64(None, self.ctx))
                if step.flags & STOP:
                    break
                if not step.flags & END_OF_CALL:
                    self._count(step)
                    self.worker.execute(step)
                else:  # a call's results follow its END_OF_CALL
                    broadcast_int64(None, self.ctx)
        if self.watch is not None:
            self.watch.stop()
        self.worker = None

    def collect_stats(self, reset: bool = False) -> list[dict]:
        """SPMD: every rank calls this at the same point of the program; rank 0 gets the list."""
        self._check()
        with self._collective():
            return gather_stats(self.ctx, reset, self.worker.weight_bytes_read) or []

    def rank_pids(self) -> dict[int, int]:
        return {self.ctx.rank: os.getpid()}

    def shutdown(self) -> None:
        self.interrupt.restore()
        if self.worker is None:
            return
        try:
            if not self.broken:
                if self.ctx.rank == 0:
                    broadcast_int64(StepInput.control(STOP).encode(), self.ctx)
                else:  # wait for rank 0's stop so that no rank leaves while others still broadcast
                    while not StepInput.decode(broadcast_int64(None, self.ctx)).flags & STOP:
                        pass
        except Exception:  # rank 0 is gone: nothing left to wait for
            self.broken = True
        finally:
            if self.watch is not None:
                self.watch.stop()
            self.worker = None

    @property
    def weight_bytes_read(self) -> int:
        return self.worker.weight_bytes_read if self.worker else 0


def _encode_results(results: list[list[int]]) -> torch.Tensor:
    return torch.tensor([len(results)] + [len(r) for r in results] + [t for r in results for t in r],
                        dtype=torch.int64)


def _decode_results(t: torch.Tensor) -> list[list[int]]:
    v = t.tolist()
    n, lengths, pos, out = v[0], v[1:1 + v[0]], 1 + v[0], []
    for length in lengths:
        out.append(v[pos:pos + length])
        pos += length
    return out

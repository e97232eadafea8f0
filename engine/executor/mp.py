"""Tensor parallelism over local processes: rank 0 in this process drives, TP−1 spawned
processes follow its step broadcasts.

Start-up waits on progress, never on a fixed deadline: ranks check in through the rendezvous
store, report each layer they read and any load error there, and the driver polls them; it fails
when a rank exits (naming it, with its error) or when no waiting rank moved for dist_timeout_s
(engine.executor.startup). After start-up a watchdog thread waits on the followers' process
sentinels: when one exits it records which, and kills the others, so that whatever collective
the driver is blocked in fails at once (a dead peer alone can leave a gloo wait pending until
its timeout). The driver's step then raises `WorkerFailure` naming the rank that died first. A
follower that raises reports its error through the store and exits; one whose driver vanishes
exits too.

SIGINT/SIGTERM to the driver (engine.executor.interrupt) kill the followers at once — they hold
nothing worth saving, and a graceful STOP could wait behind a half-done step — and the driver
raises KeyboardInterrupt / SystemExit. Followers ignore SIGINT: a Ctrl-C in a terminal reaches
the whole process group, and the driver alone decides.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm import tqdm

from engine.engine_config import EngineConfig
from engine.executor.base import Executor, WorkerFailure
from engine.executor.interrupt import InterruptGuard
from engine.executor.startup import GO_KEY, StartupWatch, describe, layers_text, report_key, wait_for_go
from engine.executor.stats import STATS, STATS_RESET, gather_stats
from engine.step import STOP, StepInput, StepOutput
from engine.worker import Worker
from parallel.collectives import broadcast_int64
from parallel.state import ParallelContext, init_process_group

logger = logging.getLogger(__name__)


def share_cpu_threads(world_size: int) -> int:
    """Split this machine's cores between the ranks; returns the previous thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    return previous


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def follow_steps(worker: Worker, ctx: ParallelContext) -> None:
    """A follower rank's loop: run every step rank 0 broadcasts until told to stop."""
    while True:
        step = StepInput.decode(broadcast_int64(None, ctx))
        if step.flags & STOP:
            return
        if step.flags & STATS:
            gather_stats(ctx, bool(step.flags & STATS_RESET), worker.weight_bytes_read)
            continue
        worker.execute(step)


def lead_stats(worker: Worker, ctx: ParallelContext, reset: bool) -> list[dict]:
    """Rank 0's side of a STATS control step: followers in `follow_steps` answer it."""
    broadcast_int64(StepInput.control(STATS | (STATS_RESET if reset else 0)).encode(), ctx)
    return gather_stats(ctx, reset, worker.weight_bytes_read)


def exit_when_orphaned(interval_s: float = 1.0) -> None:
    """Leave (hard) if the process that started us goes away: nobody would stop us otherwise."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="qshard-orphan-watch", daemon=True).start()


def _follower_main(config: EngineConfig, rank: int, world_size: int, host: str, port: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default lock is a multiprocessing semaphore, registered with the driver's resource
    # tracker; a follower killed by SIGKILL (an interrupt, a failure) would leave it "leaked".
    tqdm.set_lock(threading.RLock())
    exit_when_orphaned()
    share_cpu_threads(world_size)
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timedelta(seconds=config.dist_timeout_s))
    store.set(report_key(rank), "started")
    store.set(f"alive/{rank}", "1")
    try:
        wait_for_go(store)
        store.set(report_key(rank), "joining")
        ctx = init_process_group(rank, world_size, None, config.rank_device(rank), config.dist_timeout_s, store)
        store.set(report_key(rank), "joined")
        worker = Worker(config, ctx, on_progress=lambda done, total: store.set(report_key(rank),
                                                                                 layers_text(done, total)))
    except BaseException as e:  # report why, then die: the driver is waiting for us
        store.set(f"error/{rank}", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise SystemExit(1)
    store.set(f"ready/{rank}", "1")
    try:
        follow_steps(worker, ctx)
    except BaseException as e:  # a peer died, or this rank failed: say which, then leave at once
        try:
            store.set(f"error/{rank}", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        finally:
            os._exit(1)
    dist.destroy_process_group()


def _process_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, D, T, Z...), None when unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class _Watchdog(threading.Thread):
    """Waits on the followers' sentinels; on the first exit records it and kills the rest."""

    def __init__(self, procs: dict[int, mp.Process]):
        super().__init__(name="qshard-mp-watchdog", daemon=True)
        self.procs = procs
        self.first_dead: list[tuple[int, int | None]] = []
        self.fired = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        sentinels = {p.sentinel: r for r, p in self.procs.items()}
        while not self._halt.is_set():
            ready = mp.connection.wait(list(sentinels), timeout=0.2)
            if not ready or self._halt.is_set():
                continue
            for s in ready:
                p = self.procs[sentinels[s]]
                p.join(timeout=1)
                self.first_dead.append((sentinels[s], p.exitcode))
            logger.error("rank(s) %s exited; stopping the other ranks",
                         ", ".join(f"{r} (exit code {c})" for r, c in self.first_dead))
            for p in self.procs.values():
                if p.is_alive():
                    p.kill()
            self.fired.set()
            return

    def stop(self) -> None:
        self._halt.set()


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
        world = config.tensor_parallel_size
        if config.device == "cuda" and world > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={world} needs {world} GPUs (one per rank) but this machine "
                             f"has {torch.cuda.device_count()}")
        host = "127.0.0.1"
        port = free_port()
        self.store = dist.TCPStore(host, port, world, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=config.dist_timeout_s))
        self.procs: dict[int, mp.Process] = {}
        self.broken = False
        self.worker = None
        self.watchdog = _Watchdog(self.procs)
        # up before the first spawn: a Ctrl-C from here on kills whatever followers exist
        self.interrupt = InterruptGuard(self._on_interrupt).install()
        self._threads_before = torch.get_num_threads()
        try:
            self._spawn(config, world, host, port)
            share_cpu_threads(world)
            self._wait_for("alive", config.dist_timeout_s)
            self.store.set(GO_KEY, "1")
            self.ctx = init_process_group(0, world, None, config.rank_device(0), config.dist_timeout_s, self.store)
            self.worker = Worker(config, self.ctx)
            self._wait_for("ready", config.dist_timeout_s)
        except BaseException:
            self.interrupt.restore()
            self._kill_followers()
            torch.set_num_threads(self._threads_before)
            self.interrupt.raise_now()  # what failed because the interrupt killed the followers
            raise
        if self.procs:
            self.watchdog.start()

    def _spawn(self, config: EngineConfig, world: int, host: str, port: int) -> None:
        spawn = mp.get_context("spawn")
        for rank in range(1, world):
            p = spawn.Process(target=_follower_main, args=(config, rank, world, host, port),
                              name=f"qshard-rank{rank}", daemon=True)
            p.start()
            self.procs[rank] = p

    def _on_interrupt(self, signum: int) -> None:
        """SIGINT/SIGTERM (any thread): kill every follower now; the driver raises after."""
        self.broken = True
        self.watchdog.stop()
        for p in list(self.procs.values()):
            try:
                os.kill(p.pid, signal.SIGKILL)
            except (ProcessLookupError, TypeError):  # gone already, or not started yet
                pass

    def _wait_for(self, what: str, timeout_s: float) -> None:
        """Poll the store for every follower's `what` key, failing fast on a dead rank and when
        no waiting rank made progress for timeout_s (engine.executor.startup)."""
        pending = set(self.procs)
        watch = StartupWatch(pending, timeout_s)
        while pending:
            self.interrupt.raise_now()  # the followers are being killed: not a start-up failure
            for rank in sorted(pending):
                if self.store.check([f"error/{rank}"]):
                    msg = self.store.get(f"error/{rank}").decode()
                    raise WorkerFailure(f"rank {rank} failed to start: {msg.splitlines()[0]}\n{msg}", [rank])
                if self.store.check([f"{what}/{rank}"]):
                    pending.discard(rank)
                elif not self.procs[rank].is_alive():
                    last = watch.text(rank)
                    raise WorkerFailure(f"rank {rank} exited with code {self.procs[rank].exitcode} during start-up"
                                        + (f" (last: {describe(last)})" if last else ""), [rank])
                else:
                    key = report_key(rank)
                    watch.saw(rank, self.store.get(key).decode() if self.store.check([key]) else None,
                              self.procs[rank].pid)
            stalled = watch.stalled(pending)
            if stalled:
                raise WorkerFailure(watch.message(stalled, {r: f"pid {p.pid}" for r, p in self.procs.items()}),
                                    stalled)
            time.sleep(0.05)

    def dead_ranks(self) -> list[tuple[int, int | None]]:
        return [(r, p.exitcode) for r, p in self.procs.items() if not p.is_alive()]

    def rank_pids(self) -> dict[int, int]:
        return {0: os.getpid(), **{r: p.pid for r, p in self.procs.items()}}

    def _check(self) -> None:
        if self.interrupt.received is not None:
            raise WorkerFailure("this engine's ranks were stopped by an interrupt "
                                f"({signal.Signals(self.interrupt.received).name})")
        if self.broken or self.worker is None:
            raise WorkerFailure("this engine's ranks were stopped after an earlier failure")

    def execute(self, step: StepInput) -> StepOutput:
        self._check()
        self._count(step)
        try:
            broadcast_int64(step.encode(), self.ctx)
            return self.worker.execute(step)
        except Exception as e:
            self.interrupt.raise_now()  # the interrupt killed the peers: not a rank failure
            raise self._failure(e) from e

    def collect_stats(self, reset: bool = False) -> list[dict]:
        self._check()
        try:
            return lead_stats(self.worker, self.ctx, reset)
        except Exception as e:
            self.interrupt.raise_now()
            raise self._failure(e) from e

    def _failure(self, error: Exception) -> WorkerFailure:
        self.broken = True
        # The watchdog sees a death within 0.2 s; a collective can fail a moment before that.
        self.watchdog.fired.wait(timeout=5 if self.procs else 0)
        first = list(self.watchdog.first_dead) or self.dead_ranks()
        errors = {r: self._error_of(r) for r in self.procs}
        stuck = [r for r, p in self.procs.items() if p.is_alive() and _process_state(p.pid) in ("T", "t", "D")]
        self.watchdog.stop()
        self._kill_followers()
        if first:
            parts = []
            for r, code in first:
                why = errors.get(r)
                parts.append(f"rank {r} (pid {self.procs[r].pid}, exit code {code})"
                             + (f": {why.splitlines()[0]}" if why else ""))
            return WorkerFailure(f"{'; '.join(parts)} died during a step; stopped the other ranks",
                                 [r for r, _ in first])
        if stuck:
            return WorkerFailure(f"rank(s) {stuck} stopped responding (process stopped or in uninterruptible "
                                 f"sleep) and a collective timed out: {error}; stopped every rank", stuck)
        return WorkerFailure(f"a step failed on rank 0 (the driver): {type(error).__name__}: {error}; "
                             f"stopped every rank", [0])

    def _error_of(self, rank: int) -> str | None:
        try:
            if self.store.check([f"error/{rank}"]):
                return self.store.get(f"error/{rank}").decode()
        except Exception:  # the store lives in this process; never let a report hide the failure
            pass
        return None

    def _kill_followers(self) -> None:
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
        for p in self.procs.values():
            p.join(timeout=10)

    def shutdown(self) -> None:
        self.watchdog.stop()
        if self.worker is not None and not self.broken and not self.dead_ranks():
            try:
                broadcast_int64(StepInput.control(STOP).encode(), self.ctx)
            except Exception:  # already broken: kill below
                pass
            for p in self.procs.values():
                p.join(timeout=10)
        self._kill_followers()
        self.interrupt.restore()
        self.worker = None
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._threads_before)

    @property
    def weight_bytes_read(self) -> int:
        return self.worker.weight_bytes_read if self.worker else 0

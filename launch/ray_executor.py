"""Tensor parallelism over Ray actors: one actor per rank, behind the same Executor interface as `mp`.

Start-up:
1. Join a Ray cluster (ray_address="auto" or host:port; inside `ray job submit` the job's
   cluster) or start a local one on loopback (ray_address=None/"local"). A cluster with fewer
   CPUs/GPUs than ranks, or one that cannot be reached, is refused at once with a clear error.
2. Reserve a placement group of one bundle per rank ({"GPU": 1} on GPUs, {"CPU": 1} on CPU),
   PACK by default (placement_strategy= to change), and start one actor in each bundle.
3. Ask every actor where it runs and assign ranks by a stable sort of (not the driver's node,
   node IP, node id), so that consecutive ranks, hence TP groups, share a node and the driver's
   node comes first. Per node: local ranks in rank order, CUDA_VISIBLE_DEVICES = all of that
   node's GPUs given to us, sorted numerically, and each actor takes cuda:<local rank>.
4. Rendezvous through a TCPStore served by the driver (the executor's process); every actor
   joins the NCCL (gloo on CPU) group through it and loads only its own shard.

Start-up waits on progress (engine.executor.startup): each actor reports through that store
("started", "joining", "joined", layers read) and joins the group once all have started; the
driver fails only when an actor raises or dies (named, with its error) or no waiting rank moved
for dist_timeout_s; `startup_timeout_s` bounds only the actors' creation and the placement group.

A local cluster that the executor starts itself gets max(TP size, cores) logical CPUs, so that
TP=3 runs on a 2-core machine; `ray_num_cpus=` sets it explicitly.

Ctrl-C: SIGINT/SIGTERM to the driver alone (engine.executor.interrupt) `ray.kill` every actor at
once, the driver raises KeyboardInterrupt / SystemExit, and shutdown frees the placement group
and ends a Ray instance the executor started, without the graceful STOP. (`ray.init` installs a
SIGTERM handler of its own, `sys.exit(15)`; the executor puts the program's back under its guard.)

Steps: the driver sends each step to rank 0's actor (one Ray call), which broadcasts it to the
other actors over the gloo control group, as in `mp`; followers run a long `follow()` call.
While it waits, the driver also watches the followers' `follow()` results: an actor that dies
(process killed, `ray.kill`, OOM) or raises resolves its result at once, and the driver raises
`WorkerFailure` naming the rank, then kills every actor. Collectives have the engine's
dist_timeout_s, so a hung (not dead) rank fails the step when that runs out.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from engine.engine_config import EngineConfig
from engine.executor.base import Executor, WorkerFailure
from engine.executor.interrupt import InterruptGuard
from engine.executor.mp import follow_steps, free_port, lead_stats, share_cpu_threads
from engine.executor.startup import GO_KEY, StartupWatch, layers_text, report_key, stage, wait_for_go
from engine.step import STOP, StepInput, StepOutput
from launch.ray_cluster import NO_MULTICAST_ENV, RayClusterError, connect

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often a waiting driver looks at the followers (and lets a Ctrl-C in)


class RankActor:
    """One rank inside a Ray actor (decorated with ray.remote by the executor)."""

    def __init__(self) -> None:
        self.worker = None
        self.ctx = None

    def node_info(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "actor_id": ctx.get_actor_id()}

    def start(self, config: EngineConfig, rank: int, world_size: int, local_rank: int, local_world_size: int,
              visible_devices: str | None, host: str, port: int) -> dict:
        if visible_devices is not None:  # before CUDA initialises in this process
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
        if config.device == "cpu":
            share_cpu_threads(local_world_size)
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=config.dist_timeout_s))
        store.set(report_key(rank), "started")
        from engine.worker import Worker
        from parallel.state import init_process_group

        wait_for_go(store)
        store.set(report_key(rank), "joining")
        self.ctx = init_process_group(rank, world_size, None, config.rank_device(local_rank),
                                      config.dist_timeout_s, store)
        store.set(report_key(rank), "joined")
        self.worker = Worker(config, self.ctx, on_progress=lambda done, total: store.set(report_key(rank),
                                                                                      layers_text(done, total)))
        return {"rank": rank, "weight_bytes_read": self.worker.weight_bytes_read}

    def execute(self, step: StepInput) -> StepOutput:
        from parallel.collectives import broadcast_int64

        broadcast_int64(step.encode(), self.ctx)
        return self.worker.execute(step)

    def follow(self) -> None:
        follow_steps(self.worker, self.ctx)
        dist.destroy_process_group()

    def collect_stats(self, reset: bool) -> list[dict]:
        return lead_stats(self.worker, self.ctx, reset)

    def stop(self) -> None:
        from parallel.collectives import broadcast_int64

        broadcast_int64(StepInput.control(STOP).encode(), self.ctx)
        dist.destroy_process_group()


def assign_ranks(infos: list[dict], driver_ip: str) -> list[int]:
    """Actor indices in rank order: driver's node first, then by (IP, node id); stable."""
    return sorted(range(len(infos)), key=lambda i: (infos[i]["ip"] != driver_ip, infos[i]["ip"], infos[i]["node_id"]))


def node_layout(infos_by_rank: list[dict]) -> list[tuple[int, int, str | None]]:
    """(local rank, ranks on that node, CUDA_VISIBLE_DEVICES or None) of each rank."""
    by_node: dict[str, list[int]] = {}
    for rank, info in enumerate(infos_by_rank):
        by_node.setdefault(info["node_id"], []).append(rank)
    out = []
    for rank, info in enumerate(infos_by_rank):
        ranks = by_node[info["node_id"]]
        gpus = sorted({g for r in ranks for g in infos_by_rank[r]["gpu_ids"]}, key=lambda g: (len(g), g))
        out.append((ranks.index(rank), len(ranks), ",".join(gpus) if gpus else None))
    return out


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig, ray_address: str | None = None, placement_strategy: str = "PACK",
                 ray_num_cpus: int | None = None, ray_num_gpus: int | None = None, ray_temp_dir: str | None = None,
                 startup_timeout_s: float = 900.0, log_to_driver: bool = True):
        super().__init__(config)
        world = config.tensor_parallel_size
        self.actors: list = []  # in rank order once started
        self.infos: list[dict] = []
        self.pg = None
        self.follow_refs: dict[int, object] = {}
        self.broken = False
        self.store = None
        in_main = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if in_main else None
        self.ray, self._owns_ray = connect(ray_address, num_cpus=ray_num_cpus, num_gpus=ray_num_gpus,
                                           temp_dir=ray_temp_dir, log_to_driver=log_to_driver, min_local_cpus=world)
        if in_main and sigterm is not None and signal.getsignal(signal.SIGTERM) is not sigterm:
            signal.signal(signal.SIGTERM, sigterm)  # ray.init's sys.exit(15) -> the program's own
        self.interrupt = InterruptGuard(self._on_interrupt, "Ray actors").install()
        try:
            self._start(world, placement_strategy, startup_timeout_s)
        except BaseException:
            self.interrupt.restore()
            self._teardown()
            self.interrupt.raise_now()  # what failed because the interrupt killed the actors
            raise
        logger.info("ray executor: %d ranks on %s", world,
                    ", ".join(f"rank {r}: {i['ip']} pid {i['pid']}" for r, i in enumerate(self.infos)))

    # -- start-up -------------------------------------------------------------------------------

    def _start(self, world: int, strategy: str, timeout_s: float) -> None:
        ray = self.ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        resource = "GPU" if self.config.device == "cuda" else "CPU"
        total = ray.cluster_resources().get(resource, 0)
        if total < world:
            raise RayClusterError(
                f"tensor_parallel_size={world} needs {world} {resource}s in the Ray cluster (one bundle per rank) "
                f"but it has {total:g}" + (" (start it with more --num-cpus, or pass ray_num_cpus=)"
                                            if resource == "CPU" else ""))
        self.pg = placement_group([{resource: 1}] * world, strategy=strategy, name=f"qshard-tp{world}-{os.getpid()}")
        try:
            ray.get(self.pg.ready(), timeout=min(timeout_s, 120))
        except ray.exceptions.GetTimeoutError:
            raise RayClusterError(f"could not reserve {world} bundles of {{{resource!r}: 1}} ({strategy}) in the "
                                  f"Ray cluster within 120s; available now: {ray.available_resources()}") from None
        env = dict(NO_MULTICAST_ENV)
        for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "TRITON_INTERPRET"):
            if key in os.environ:
                env[key] = os.environ[key]
        remote = ray.remote(RankActor)
        actors = [remote.options(
            num_cpus=1 if resource == "CPU" else 0, num_gpus=1 if resource == "GPU" else 0, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                                 placement_group_bundle_index=i),
            runtime_env={"env_vars": env}).remote() for i in range(world)]
        self.actors = actors  # bundle order until ranks are known (for teardown)
        infos = self._get([a.node_info.remote() for a in actors], timeout_s, "report its node", label="actor")
        driver_ip = ray.util.get_node_ip_address()
        order = assign_ranks(infos, driver_ip)
        self.actors = [actors[i] for i in order]
        self.infos = [infos[i] for i in order]
        layout = node_layout(self.infos)
        host = driver_ip
        port = free_port("0.0.0.0" if host not in ("127.0.0.1", "localhost") else host)
        self.store = dist.TCPStore(host, port, world, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=self.config.dist_timeout_s))
        refs = [a.start.remote(self.config, r, world, local, local_world, visible, host, port)
                for r, (a, (local, local_world, visible)) in enumerate(zip(self.actors, layout))]
        driver_node = ray.get_runtime_context().get_node_id()
        local_pids = {r: i["pid"] for r, i in enumerate(self.infos) if i["node_id"] == driver_node}
        self._get(refs, timeout_s, "load its shard", progress=StartupWatch(range(world), self.config.dist_timeout_s),
                  local_pids=local_pids, where={r: f"pid {i['pid']} on {i['ip']}" for r, i in enumerate(self.infos)})
        self.follow_refs = {r: self.actors[r].follow.remote() for r in range(1, world)}

    def _get(self, refs: list, timeout_s: float, what: str, label: str = "rank",
             progress: StartupWatch | None = None, local_pids: dict[int, int] | None = None,
             where: dict[int, str] | None = None) -> list:
        """ray.get of one ref per rank (or actor, before ranks exist), failing fast and by name:
        with `progress`, when no waiting rank moved for its timeout, else after timeout_s."""
        ray = self.ray
        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            self.interrupt.raise_now()  # the interrupt killed the actors: not a start-up failure
            waiting = [refs.index(r) for r in pending]
            if progress is not None:
                for rank in waiting:
                    key = report_key(rank)
                    progress.saw(rank, self.store.get(key).decode() if self.store.check([key]) else None,
                                 (local_pids or {}).get(rank))
                if not self.store.check([GO_KEY]) and all(progress.text(r) is not None for r in range(len(refs))):
                    self.store.set(GO_KEY, "1")  # every rank checked in: join the group together
            for ref in ready:
                rank = refs.index(ref)
                try:
                    ray.get(ref)
                except Exception as e:
                    if progress is not None:  # gave up waiting in the rendezvous for a rank behind it?
                        behind = [r for r in waiting if stage(progress.text(r)) < stage(progress.text(rank))]
                        if behind:
                            raise WorkerFailure(f"{progress.message(behind, where)}; rank {rank} gave up waiting: "
                                                f"{_cause(e)}", behind) from e
                    raise WorkerFailure(f"{label} {rank} failed to {what}: {_cause(e)}",
                                        [rank] if label == "rank" else []) from e
            if progress is not None:
                stalled = progress.stalled(waiting)
                if stalled:
                    raise WorkerFailure(progress.message(stalled, where), stalled)
            elif pending and time.monotonic() > deadline:
                raise WorkerFailure(f"{label}s {waiting} did not {what} within {timeout_s:.0f}s",
                                    waiting if label == "rank" else [])
        return ray.get(refs)

    # -- steps ----------------------------------------------------------------------------------

    def _check(self) -> None:
        if self.interrupt.received is not None:
            raise WorkerFailure("this engine's ranks were stopped by an interrupt "
                                f"({signal.Signals(self.interrupt.received).name})")
        if self.broken or not self.actors:
            raise WorkerFailure("this engine's ranks were stopped after an earlier failure")

    def _await(self, ref, what: str):
        """Rank 0's answer, watching every follower meanwhile."""
        ray = self.ray
        watch = [ref, *self.follow_refs.values()]
        deadline = time.monotonic() + self.config.dist_timeout_s + 30
        while True:
            ready, _ = ray.wait(watch, num_returns=1, timeout=POLL_S)
            self.interrupt.raise_now()  # the interrupt killed the actors: not a rank failure
            if ref in ready:
                try:
                    return ray.get(ref)
                except Exception as e:
                    raise self._failure(ref, e) from e
            if ready:  # a follower's loop ended: it died or raised
                raise self._failure(ref, None)
            if time.monotonic() > deadline:
                raise self._failure(ref, TimeoutError(f"no answer to {what} within "
                                                      f"{self.config.dist_timeout_s + 30:.0f}s"))

    def execute(self, step: StepInput) -> StepOutput:
        self._check()
        self._count(step)
        return self._await(self.actors[0].execute.remote(step), "a step")

    def collect_stats(self, reset: bool = False) -> list[dict]:
        self._check()
        return self._await(self.actors[0].collect_stats.remote(reset), "a stats request")

    def rank_pids(self) -> dict[int, int]:
        return {r: info["pid"] for r, info in enumerate(self.infos)}

    def rank_actors(self) -> list:
        return list(self.actors)

    # -- failures -------------------------------------------------------------------------------

    def _failure(self, rank0_ref, error: BaseException | None) -> WorkerFailure:
        """Find which ranks died (or raised), stop every actor, and say so."""
        ray = self.ray
        self.broken = True
        probes = {0: rank0_ref, **self.follow_refs}
        # Ray learns of a death a moment after the dead rank's peers fail: wait for it (up to 10 s,
        # or 2 s once some rank has reported an error of its own).
        start = time.monotonic()
        while True:
            died, raised = {}, {}
            for rank, ref in probes.items():
                ready, _ = ray.wait([ref], timeout=0)
                if not ready:
                    continue
                try:
                    ray.get(ref)
                    raised[rank] = "returned early"
                except ray.exceptions.RayActorError as e:
                    died[rank] = _cause(e)
                except Exception as e:
                    raised[rank] = _cause(e)
            waited = time.monotonic() - start
            if died or waited > 10 or (waited > 2 and any(r != 0 for r in raised)):
                break
            time.sleep(0.1)
        pids = self.rank_pids()
        self._teardown()
        _wait_gone(pids.values(), 10)
        if died:
            names = "; ".join(f"rank {r} (pid {self.infos[r]['pid']} on {self.infos[r]['ip']}) died: {why}"
                              for r, why in sorted(died.items()))
            return WorkerFailure(f"{names}; stopped the other ranks", sorted(died))
        culprits = {r: why for r, why in raised.items() if r != 0} or raised
        if culprits:
            r, why = min(culprits.items())
            return WorkerFailure(f"rank {r} failed: {why}; stopped every rank", [r])
        return WorkerFailure(f"the ranks stopped answering ({error}); stopped every rank", [])

    # -- shutdown -------------------------------------------------------------------------------

    def _on_interrupt(self, signum: int) -> None:
        """SIGINT/SIGTERM (any thread): kill every actor now; the driver raises after."""
        self.broken = True
        for a in list(self.actors):
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:
                pass

    def _teardown(self) -> None:
        """Kill every actor, free the placement group, leave Ray if we joined or started it."""
        ray = self.ray
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors, self.follow_refs = [], {}
        if self.pg is not None:
            try:
                ray.util.remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
        self.store = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    def shutdown(self) -> None:
        self.interrupt.restore()
        if not self.actors and self.pg is None:
            return
        ray = self.ray
        if not self.broken and self.actors:
            try:
                ray.get(self.actors[0].stop.remote(), timeout=30)
                ray.get(list(self.follow_refs.values()), timeout=30)
            except Exception as e:  # already broken: kill below
                logger.warning("ray executor: ranks did not stop cleanly (%s); killing them", _cause(e))
        pids = self.rank_pids()
        self._teardown()
        _wait_gone(pids.values(), 10)


def _cause(e: BaseException) -> str:
    """The first line that says what went wrong, without Ray's wrapping."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else type(cause).__name__
    return f"{type(cause).__name__}: {last}"[:500]


def _wait_gone(pids, timeout_s: float) -> None:
    """Wait (briefly) for killed actor processes on this host to exit."""
    from engine.executor.peers import pid_alive

    deadline = time.monotonic() + timeout_s
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        pending = {p for p in pending if pid_alive(p)}
        if pending:
            time.sleep(0.1)

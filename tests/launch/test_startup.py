"""Rank start-up waits on progress, not on a fixed deadline: a TP=3 mp start on a machine kept
busy by CPU-burning processes succeeds although it takes longer in total than the timeout,
and a rank that hangs before loading (SIGSTOP right after it is spawned) is named by rank within
the timeout, with every process cleaned up."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from engine import LLM, SamplingParams
from engine.executor import WorkerFailure
from tests.launch.conftest import PROMPTS, kill_pid_tree, wait_gone

TIMEOUT_S = 8.0  # dist_timeout_s of the hang tests
LOAD_TIMEOUT_S = 3.0  # dist_timeout_s shorter than a TP=3 start on this 2-core machine kept busy


def burn_cpus(n: int = 2) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def spawned_followers() -> list:
    """This process's spawned multiprocessing children, oldest first (rank 1 starts first)."""
    import psutil

    kids = []
    for p in psutil.Process().children():
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                kids.append(p)
        except psutil.NoSuchProcess:
            pass
    return sorted(kids, key=lambda p: (p.create_time(), p.pid))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_tp3_start_on_a_busy_machine_outlasts_the_timeout_and_succeeds(model_dir, reference):
    # six CPU burners on two cores: each rank gets a fraction of a core while it imports and loads
    burners = burn_cpus(6)
    try:
        time.sleep(1)
        start = time.monotonic()
        with LLM(model_dir, tensor_parallel_size=3, executor="mp", dtype="float32", progress=False,
                 dist_timeout_s=LOAD_TIMEOUT_S) as llm:
            started = time.monotonic() - start
            for b in burners:  # the rest of the test needs no load
                b.kill()
            outs = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0))
        print(f"\nTP=3 start under load: {started:.1f}s with dist_timeout_s={LOAD_TIMEOUT_S:.0f}")
        assert started > LOAD_TIMEOUT_S, f"start-up took {started:.1f}s: the machine was not busy enough to show it"
        assert outs[0].token_ids == reference.mp_tokens[0][:4]
    finally:
        for b in burners:
            b.kill()
            b.wait()


@pytest.mark.timeout(200)
def test_rank_hung_before_loading_is_named_within_the_timeout(model_dir):
    stopped: list = []
    result: dict = {}

    def start():
        try:
            LLM(model_dir, tensor_parallel_size=3, executor="mp", dtype="float32", progress=False,
                dist_timeout_s=TIMEOUT_S)
            result["error"] = None
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            result["error"] = e
        result["at"] = time.monotonic()

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not stopped and time.monotonic() < deadline:
            kids = spawned_followers()
            if kids:
                os.kill(kids[0].pid, signal.SIGSTOP)  # rank 1, before it could import anything
                stopped.append(kids[0])
                stopped_at = time.monotonic()
            time.sleep(0.005)
        assert stopped, "rank 1 was never spawned"
        thread.join(timeout=TIMEOUT_S + 60)
        assert not thread.is_alive(), "LLM(...) still starting long after the timeout"
        error = result["error"]
        took = result["at"] - stopped_at
        print(f"\n{type(error).__name__}: {error} ({took:.1f}s after the stop)")
        assert isinstance(error, WorkerFailure), repr(error)
        assert error.ranks == [1], error.ranks
        assert str(error).startswith(f"rank 1 (pid {stopped[0].pid}) hung before loading (no progress for "), str(error)
        assert TIMEOUT_S <= took < TIMEOUT_S + 10
        assert not wait_gone([stopped[0].pid], 10), "the hung rank was not cleaned up"
        assert not spawned_followers(), "follower processes left behind"
    finally:
        for p in stopped:
            try:
                p.resume()
            except Exception:
                pass
        kill_pid_tree([p.pid for p in spawned_followers()])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_tp3_starts_with_no_cpu_option_on_a_small_machine(model_dir, reference, tmp_path):
    """A local Ray cluster the executor starts itself gets max(TP size, cores) logical CPUs."""
    import tempfile

    import ray

    temp_dir = tempfile.mkdtemp(prefix="qshard-raysize-")  # short: Ray's socket paths must fit
    try:
        with LLM(model_dir, tensor_parallel_size=3, executor="ray", dtype="float32", progress=False,
                 ray_temp_dir=temp_dir, log_to_driver=False) as llm:
            cpus = ray.cluster_resources().get("CPU")
            outs = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0))
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert cpus == max(3, os.cpu_count()), cpus
    assert outs[0].token_ids == reference.mp_tokens[0][:4]
    assert not ray.is_initialized()


def rank_actor_processes() -> list:
    """Ray worker processes running RankActor.start (Ray titles a worker by the method it runs)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "RankActor.start" in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_rank_that_stops_while_starting_is_named_within_the_timeout(model_dir):
    import tempfile

    import ray

    temp_dir = tempfile.mkdtemp(prefix="qshard-rayhang-")
    result: dict = {}

    def start():
        try:
            LLM(model_dir, tensor_parallel_size=3, executor="ray", dtype="float32", progress=False,
                dist_timeout_s=TIMEOUT_S, ray_temp_dir=temp_dir, log_to_driver=False).shutdown()
            result["error"] = None
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            result["error"] = e
        result["at"] = time.monotonic()

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    stopped = None
    try:
        deadline = time.monotonic() + 180
        while stopped is None and time.monotonic() < deadline and thread.is_alive():
            actors = rank_actor_processes()
            if actors:
                stopped = actors[0]
                stopped.suspend()  # SIGSTOP, as soon as it starts its rank
                stopped_at = time.monotonic()
            time.sleep(0.01)
        assert stopped is not None, f"no actor was seen starting: {result}"
        thread.join(timeout=TIMEOUT_S + 90)
        assert not thread.is_alive(), "LLM(...) still starting long after the timeout"
        error, took = result["error"], result["at"] - stopped_at
        print(f"\n{type(error).__name__}: {error} ({took:.1f}s after the stop)")
        assert isinstance(error, WorkerFailure), repr(error)
        assert len(error.ranks) == 1, error.ranks
        assert str(error).startswith(f"rank {error.ranks[0]} (pid {stopped.pid} on 127.0.0.1) "), str(error)
        assert "hung before loading" in str(error) or "made no progress" in str(error), str(error)
        assert took < TIMEOUT_S + 30
        assert not wait_gone([stopped.pid], 10), "the stopped actor is still there"
        assert not ray.is_initialized()
    finally:
        if stopped is not None:
            try:
                stopped.resume()
            except Exception:
                pass
        from tests.launch.conftest import _cluster_pids

        # A driver still connected when its raylet dies is ended by Ray's core worker (exit code 1):
        # that would take pytest down with it.
        if ray.is_initialized():
            ray.shutdown()
        kill_pid_tree(_cluster_pids(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)

"""Fixtures for the launcher tests: the default model, reference outputs of the `mp` executor,
a loopback Ray cluster started with `ray start --head` (always stopped, even on failure), and
helpers to kill a rank during generation."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Keep every Ray process on loopback (see launch/ray_cluster.py); set before anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Test clusters are loopback-only and short-lived: no token authentication (Ray turns it on for
# new clusters when ~/.ray/auth_token exists, and then a driver joining by address is refused).
os.environ["RAY_AUTH_MODE"] = "disabled"

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: this venv first on PATH, the model cache, loopback Ray."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                "PYTHONUNBUFFERED": "1"}, **extra)
    return env


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The converted default model (instant when QSHARD_CACHE points at an existing conversion)."""
    from engine.default_model import prepare_default

    return prepare_default()


@dataclass
class Reference:
    tp1_tokens: list[list[int]]
    mp_tokens: list[list[int]]
    mp_texts: list[str]


@pytest.fixture(scope="session")
def reference(model_dir) -> Reference:
    """Greedy outputs of PROMPTS at TP=1 (uni) and TP=3 (mp), float32."""
    from engine import LLM, SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    with LLM(model_dir, dtype="float32", progress=False) as llm:
        tp1 = [o.token_ids for o in llm.generate(PROMPTS, params)]
    with LLM(model_dir, tensor_parallel_size=3, executor="mp", dtype="float32", progress=False) as llm:
        outs = llm.generate(PROMPTS, params)
    return Reference(tp1, [o.token_ids for o in outs], [o.text for o in outs])


# -- processes -----------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    from engine.executor.peers import pid_alive as alive

    return alive(pid)


def wait_gone(pids, timeout_s: float = 15.0) -> set[int]:
    """The pids still running after up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    left = set(pids)
    while left and time.monotonic() < deadline:
        left = {p for p in left if pid_alive(p)}
        time.sleep(0.1)
    return left


def kill_pid_tree(pids, grace_s: float = 5.0) -> None:
    import psutil

    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


@dataclass
class Killing:
    """What `kill_during_generation` did: when, and the failure it caught."""

    killed_at: float | None = None
    raised_at: float | None = None
    error: BaseException | None = None


def kill_during_generation(llm, rank: int, how, after_steps: int = 3, max_tokens: int = 2000) -> Killing:
    """Start a long generation and, once `after_steps` steps ran, call how(rank); returns when
    generate() raises (or, wrongly, finishes)."""
    from engine import SamplingParams

    out = Killing()

    def killer():
        while llm.executor is not None and llm.executor.steps_run < after_steps:
            time.sleep(0.02)
        out.killed_at = time.monotonic()
        how(rank)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    except Exception as e:  # noqa: BLE001 - the test inspects it
        out.error = e
    out.raised_at = time.monotonic()
    thread.join(timeout=5)
    return out


# -- a Ray cluster of our own ---------------------------------------------------------------------


@dataclass
class RayCluster:
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    env: dict[str, str]


def _cluster_pids(temp_dir: str, gcs_address: str | None = None) -> list[int]:
    """Ray's daemons for this cluster name its temp dir (or, the client server, its GCS address)
    on their command line."""
    import psutil

    marks = [temp_dir] + ([f"--address={gcs_address}"] if gcs_address else [])
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(m in arg for arg in (p.info["cmdline"] or []) for m in marks):
                pids.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


def stop_cluster(temp_dir: str, gcs_address: str | None = None) -> None:
    """`ray stop` for this cluster only: `ray stop` itself ends every Ray cluster of the user on
    the machine, other people's included. Workers and agents are the daemons' descendants."""
    kill_pid_tree(_cluster_pids(temp_dir, gcs_address))


@pytest.fixture(scope="session")
def ray_cluster():
    """`ray start --head` on loopback with 4 logical CPUs (TP=3 fits, TP=9 does not)."""
    temp_dir = tempfile.mkdtemp(prefix="qshard-raytest-")
    port, dash = free_port(), free_port()
    env = child_env()
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--port={port}", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--num-cpus=4",
           "--num-gpus=0", "--include-dashboard=true", "--disable-usage-stats",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--metrics-export-port={free_port()}"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"ray start failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        yield RayCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp_dir, env)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        stop_cluster(temp_dir, f"127.0.0.1:{port}")
        left = _cluster_pids(temp_dir, f"127.0.0.1:{port}")
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left behind: {left}"


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)

"""torchrun SPMD: `torchrun -m launch.torchrun generate` prints what mp gives, and a killed rank
is named by rank 0 within 30 s with every rank process gone."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import pytest

from tests.launch.conftest import MAX_TOKENS, PROMPTS, child_env, kill_pid_tree, wait_gone

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_generate_prints_what_mp_gives(model_dir, reference):
    cmd = TORCHRUN + ["--nproc-per-node", "3", "-m", "launch.torchrun", "--log-level", "WARNING", "generate",
                      "--model", str(model_dir), "--dtype", "float32", "--max-tokens", str(MAX_TOKENS)]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # what `qshard generate` prints for each prompt, with mp's texts
    expected = "".join(f"### prompt: {p}\n{t}\n\n" for p, t in zip(PROMPTS, reference.mp_texts))
    assert proc.stdout.startswith(expected), proc.stdout
    assert re.search(r"tp=3 executor=external ", proc.stdout)
    assert proc.stdout.count("### prompt:") == len(PROMPTS)  # printed by rank 0 only


def test_tp_disagreeing_with_torchrun_is_refused():
    cmd = TORCHRUN + ["--nproc-per-node", "1", "-m", "launch.torchrun", "generate", "--tp", "2", "--prompt", "x"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--tp 2 disagrees with torchrun's 1 ranks" in proc.stderr


def _rank_pids(root_pid: int) -> dict[int, int]:
    import psutil

    out = {}
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            env = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in env and "TORCHELASTIC_RUN_ID" in env and "launch.torchrun" in " ".join(p.cmdline()):
            out[int(env["RANK"])] = p.pid
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_rank_is_named_within_30s_and_every_rank_exits(model_dir, tmp_path):
    # bench mode: ignore_eos generation long enough to be killed in the middle
    cmd = TORCHRUN + ["--nproc-per-node", "3", "-m", "launch.torchrun", "--log-level", "INFO", "bench", "throughput",
                      "--model", str(model_dir), "--dtype", "float32", "--batch", "1", "--input-len", "8",
                      "--output-len", "3000", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    warm = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "generated 4 tokens" in line:  # the warm-up call is over: the long one starts
                warm.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ranks: dict[int, int] = {}
    try:
        assert warm.wait(180), "".join(lines[-40:])
        ranks = _rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1, 2], ranks
        time.sleep(2)  # some steps into the measured generation
        killed_at = time.monotonic()
        import os
        import signal

        os.kill(ranks[1], signal.SIGKILL)
        proc.wait(timeout=60)
        ended_at = time.monotonic()
        reader.join(timeout=5)
        text = "".join(lines)
        assert proc.returncode != 0
        # rank 2 may notice first and stop too; rank 0 then names both, rank 1 among them
        assert re.search(r"rank0 .*WorkerFailure: .*rank 1 \(pid \d+ on \S+ is gone\).* died", text), text[-4000:]
        assert ended_at - killed_at < 30, f"{ended_at - killed_at:.1f}s"
        assert not wait_gone(ranks.values(), 10), "rank processes still running"
    finally:
        if proc.poll() is None:
            kill_pid_tree([proc.pid])
        if ranks:
            kill_pid_tree(ranks.values())

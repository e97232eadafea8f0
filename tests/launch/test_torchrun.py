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


class LongGeneration:
    """A TP=3 torchrun bench whose measured ignore_eos generation runs long enough to be killed or
    interrupted in the middle. Use as a context manager: it returns once that generation started
    (`ranks` then holds the rank pids) and kills whatever is left on the way out."""

    def __init__(self, model_dir, out_dir, warm_timeout_s: float = 240):
        from tests.launch.conftest import REPO

        cmd = TORCHRUN + ["--nproc-per-node", "3", "-m", "launch.torchrun", "--log-level", "INFO", "bench",
                          "throughput", "--model", str(model_dir), "--dtype", "float32", "--batch", "1",
                          "--input-len", "8", "--output-len", "3000", "--out", str(out_dir)]
        self.cmd, self.cwd, self.warm_timeout_s = cmd, REPO, warm_timeout_s
        self.lines: list[str] = []
        self.ranks: dict[int, int] = {}
        self._warm = threading.Event()

    def __enter__(self) -> "LongGeneration":
        self.proc = subprocess.Popen(self.cmd, env=child_env(), cwd=self.cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            assert self._warm.wait(self.warm_timeout_s), "".join(self.lines[-40:])
            self.ranks = _rank_pids(self.proc.pid)
            assert sorted(self.ranks) == [0, 1, 2], self.ranks
        except BaseException:
            self.__exit__()
            raise
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "generated 4 tokens" in line:  # the warm-up call is over: the long one starts
                self._warm.set()

    def output(self) -> str:
        """Everything printed, once the process has ended."""
        self._reader.join(timeout=5)
        return "".join(self.lines)

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            kill_pid_tree([self.proc.pid])
        if self.ranks:
            kill_pid_tree(self.ranks.values())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_rank_is_named_within_30s_and_every_rank_exits(model_dir, tmp_path):
    import os
    import signal

    with LongGeneration(model_dir, tmp_path, warm_timeout_s=180) as run:
        time.sleep(2)  # some steps into the measured generation
        killed_at = time.monotonic()
        os.kill(run.ranks[1], signal.SIGKILL)
        run.proc.wait(timeout=60)
        ended_at = time.monotonic()
        text = run.output()
        assert run.proc.returncode != 0
        # rank 2 may notice first and stop too; rank 0 then names both, rank 1 among them
        assert re.search(r"rank0 .*WorkerFailure: .*rank 1 \(pid \d+ on \S+ is gone\).* died", text), text[-4000:]
        assert ended_at - killed_at < 30, f"{ended_at - killed_at:.1f}s"
        assert not wait_gone(run.ranks.values(), 10), "rank processes still running"
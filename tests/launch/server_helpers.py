"""A `qshard serve` subprocess for the server tests: started on a free loopback port, waited for
(/health), and stopped with SIGTERM, every process it started (executor ranks) checked gone."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.launch.conftest import BIN, PROMPTS, REPO, child_env, free_port, kill_pid_tree, wait_gone

API_KEY = "test-key-7"
MAX_TOKENS = 12
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


# a sampled request with n and a seed: the server's n choices must equal the engine's n completions
SAMPLED = dict(max_tokens=6, temperature=1.0, n=2, seed=7)


@functools.lru_cache(maxsize=None)
def llm_reference(model_dir: Path) -> tuple[list[str], str, list[dict], int, list[str]]:
    """LLM.generate(PROMPTS) and LLM.chat(CHAT) greedy texts in process (TP=1, float32), once per
    test session, and PROMPTS[0] sampled under SAMPLED: (texts, chat text, CHAT, MAX_TOKENS, sampled)."""
    from engine import LLM, SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    with LLM(model_dir, dtype="float32", progress=False) as llm:
        texts = [o.text for o in llm.generate(PROMPTS, params)]
        chat = llm.chat(CHAT, params)[0].text
        sampled = [c.text for c in llm.generate(PROMPTS[:1], SamplingParams(**SAMPLED))[0].outputs]
    return texts, chat, CHAT, MAX_TOKENS, sampled


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    log: Path
    model: str  # the name /v1/models lists

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", API_KEY), max_retries=0,
                      timeout=kw.pop("timeout", 120), **kw)

    def metrics(self) -> dict[str, float]:
        """/metrics samples without labels (plus labelled ones under their full name)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


def launch_server(log_dir: Path, *args: str, cwd: Path | None = None, command: list[str] | None = None) -> Server:
    """Start `qshard serve --model default ... --port P` (or `command` + --port P); not waited for."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    cmd = (command or [str(BIN / "qshard"), "serve", "--model", "default"]) + ["--port", str(port), *args]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(), cwd=cwd or REPO,
                                start_new_session=True)
    return Server(f"http://127.0.0.1:{port}", proc, log, "")


def wait_ready(server: Server, timeout_s: float = 300) -> Server:
    """Once /health answers 200 (the model name from /v1/models); stops the server on failure."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"qshard serve exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                server.model = httpx.get(f"{server.url}/v1/models", timeout=5,
                                         headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]["id"]
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(server)
    raise RuntimeError(f"qshard serve did not come up in {timeout_s:.0f} s:\n{server.log_tail()}")


def start_server(log_dir: Path, *args: str, timeout_s: float = 300, cwd: Path | None = None,
                 command: list[str] | None = None) -> Server:
    return wait_ready(launch_server(log_dir, *args, cwd=cwd, command=command), timeout_s)


def descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_server(server: Server, timeout_s: float = 30) -> tuple[int | None, list[int]]:
    """SIGTERM, then (only if it hangs) kill the tree. Returns (exit code, pids left running)."""
    children = descendants(server.proc.pid)
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    left = sorted(wait_gone(children, 10))
    if code is None or left:
        kill_pid_tree([server.proc.pid, *left])
        try:
            os.killpg(server.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        server.proc.wait(timeout=10)
    return code, left

"""`qshard serve` at TP=3 through the mp executor, the Ray executor (a local loopback cluster it
starts and stops itself) and torchrun (rank 0 serves, ranks 1-2 follow): greedy completions and
chat, streamed and not, through the `openai` client equal LLM.generate / LLM.chat at TP=1
(float32, the same tokens the mp and Ray executor tests pin down), and a SIGTERM stops every
rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.launch.conftest import PROMPTS, wait_gone
from tests.launch.server_helpers import API_KEY, descendants, launch_server, llm_reference, stop_server, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
            "-m", "launch.torchrun", "serve", "--model", "default"]
LAUNCHES = {
    "mp": (None, ["--tp", "3", "--executor", "mp"]),
    "ray": (None, ["--tp", "3", "--executor", "ray", "--ray-num-cpus", "3"]),
    "torchrun": (TORCHRUN, []),
}


@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_tp3_server_answers_like_llm_generate(model_dir, tmp_path, launch):
    command, args = LAUNCHES[launch]
    start = time.monotonic()
    server = launch_server(tmp_path, *args, "--dtype", "float32", "--api-key", API_KEY, command=command)
    try:
        expected_texts, expected_chat, chat, max_tokens, _ = llm_reference(model_dir)  # while it loads
        wait_ready(server)
        up = time.monotonic() - start
        ranks = descendants(server.proc.pid)
        client = server.client()
        got = client.completions.create(model=server.model, prompt=PROMPTS, max_tokens=max_tokens, temperature=0)
        assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == expected_texts
        streamed = ""
        for chunk in client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=max_tokens,
                                               temperature=0, stream=True):
            streamed += "".join(c.text for c in chunk.choices)
        assert streamed == expected_texts[0]
        reply = client.chat.completions.create(model=server.model, messages=chat, max_tokens=max_tokens,
                                               temperature=0)
        assert reply.choices[0].message.content == expected_chat
        streamed = ""
        for chunk in client.chat.completions.create(model=server.model, messages=chat, max_tokens=max_tokens,
                                                    temperature=0, stream=True):
            streamed += "".join(c.delta.content or "" for c in chunk.choices)
        assert streamed == expected_chat
    finally:
        if launch == "torchrun":  # SIGTERM to rank 0 alone: it stops serving and sends STOP to ranks 1-2
            rank0 = _rank0_pid(server.proc.pid)
            if rank0 is not None:
                os.kill(rank0, signal.SIGTERM)
                try:
                    server.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
        code, left = stop_server(server, timeout_s=60)
    log = server.log.read_text(errors="replace")
    assert code == 0 and not left, f"exit {code}, left {left}:\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]
    assert not wait_gone(ranks, 10)
    print(f"{launch} tp=3 server up in {up:.1f}s")


def _rank0_pid(root: int) -> int | None:
    import psutil

    for pid in descendants(root):
        try:
            p = psutil.Process(pid)
            if p.environ().get("RANK") == "0" and "launch.torchrun" in " ".join(p.cmdline()):
                return pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return None

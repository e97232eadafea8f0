"""`qshard serve` at TP=1 through the official `openai` client: greedy completions and chat
(streamed and not) equal LLM.generate / LLM.chat, 64 concurrent streams each equal to their
prompt run alone, a late request starting while others decode, OpenAI-schema errors (400 naming
the field, 401, 404, 413) that leave the server serving, a disconnect that aborts its request,
/metrics, and `qshard bench serve` against it. One server for the module (float32, API key set,
max_model_len 1024)."""

from __future__ import annotations

import asyncio
import math
import subprocess
import time

import httpx
import pytest

from tests.launch.conftest import BIN, PROMPTS, child_env
from tests.launch.server_helpers import (API_KEY, CHAT, MAX_TOKENS, SAMPLED, launch_server, llm_reference,
                                         stop_server, wait_ready)

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 1024
MAX_IN_FLIGHT = 64


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    """The server, and LLM.generate / LLM.chat's texts computed while it loads."""
    s = launch_server(tmp_path_factory.mktemp("serve-tp1"), "--executor", "uni", "--dtype", "float32",
                      "--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN), "--max-in-flight", str(MAX_IN_FLIGHT))
    try:
        texts, chat, _, _, sampled = llm_reference(model_dir)
        wait_ready(s)
        yield s, (texts, chat, sampled)
    finally:
        code, left = stop_server(s)
    assert code == 0 and not left, f"exit {code}, left {left}:\n{s.log_tail()}"
    assert "Traceback" not in s.log.read_text(), s.log_tail()


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def expected(served):
    return served[1]


def _stream_text(stream, chat: bool) -> tuple[str, str | None, object]:
    text, reason, use = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            use = chunk.usage
        for c in chunk.choices:
            text += (c.delta.content or "") if chat else c.text
            reason = c.finish_reason or reason
    return text, reason, use


def test_completions_and_chat_equal_llm_generate(server, expected):
    texts, chat_text, _ = expected
    client = server.client()
    got = client.completions.create(model=server.model, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == texts
    assert got.usage.completion_tokens == MAX_TOKENS * len(PROMPTS) or all(c.finish_reason for c in got.choices)
    for prompt, want in zip(PROMPTS, texts):
        stream = client.completions.create(model=server.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        text, reason, use = _stream_text(stream, chat=False)
        assert text == want and reason in ("stop", "length")
        assert use.prompt_tokens > 0 and use.completion_tokens <= MAX_TOKENS
    reply = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == chat_text and reply.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, _, use = _stream_text(stream, chat=True)
    assert text == chat_text and use.completion_tokens == reply.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == [server.model]


def test_n_logprobs_and_stop_through_the_api(server, expected):
    texts, _, sampled = expected
    client = server.client()
    got = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=6, temperature=0, n=2,
                                    logprobs=2)
    assert sorted(c.index for c in got.choices) == [0, 1]
    assert all(c.text == texts[0][:len(c.text)] and c.text for c in got.choices)  # greedy: a prefix of 12 tokens'
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(x <= 0 for x in lp.token_logprobs) and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == got.choices[0].text
    assert got.usage.completion_tokens == 12
    seeded = client.completions.create(model=server.model, prompt=PROMPTS[0], **SAMPLED)  # n=2, seed 7
    assert [c.text for c in sorted(seeded.choices, key=lambda c: c.index)] == sampled  # the engine's own n
    reply = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    stop_at = texts[0].split()[1]  # a word the greedy answer contains
    cut = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                    stop=[stop_at])
    assert cut.choices[0].finish_reason == "stop" and texts[0].startswith(cut.choices[0].text)
    assert stop_at not in cut.choices[0].text


# mixed lengths: 8 prompts from 4 to ~120 tokens, 8 clients each
MIXED = ["Hello", "The capital of France is", "def fibonacci(n):",
         "Write a haiku about the sea. " * 3, "List three colours: red,",
         "In 1492, Columbus " + "sailed the ocean blue and " * 4,
         "Once upon a time, " * 8, "Q: what is 2 + 2?\nA:"]


def test_64_concurrent_streams_each_equal_their_prompt_alone(server):
    from openai import AsyncOpenAI

    client = server.client()
    alone = [client.completions.create(model=server.model, prompt=p, max_tokens=8, temperature=0).choices[0].text
             for p in MIXED]

    async def burst():
        aclient = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

        async def one(i: int):
            stream = await aclient.completions.create(model=server.model, prompt=MIXED[i % len(MIXED)],
                                                      max_tokens=8, temperature=0, stream=True)
            text, reason = "", None
            async for chunk in stream:
                for c in chunk.choices:
                    text += c.text
                    reason = c.finish_reason or reason
            return text, reason

        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await aclient.close()

    start = time.monotonic()
    results = asyncio.run(burst())
    elapsed = time.monotonic() - start
    assert len(results) == 64 and all(reason in ("stop", "length") for _, reason in results)
    mismatched = [i for i, (text, _) in enumerate(results) if text != alone[i % len(MIXED)]]
    assert not mismatched, [(i, results[i][0], alone[i % len(MIXED)]) for i in mismatched[:4]]
    print(f"64 concurrent streams in {elapsed:.1f}s")


def test_a_request_arriving_mid_decode_starts_before_the_others_finish(server):
    """Four long streams decode; a fifth arrives after each has tokens: its first token comes
    before any of the four finishes (continuous batching, not request after request)."""
    import threading

    client = server.client()
    started = threading.Barrier(5)
    long_done: list[float] = []

    def long_stream():
        stream = client.completions.create(model=server.model, prompt="Count: one, two,", max_tokens=40,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        first = True
        for chunk in stream:
            if first and chunk.choices and chunk.choices[0].text:
                first = False
                started.wait(timeout=60)
        long_done.append(time.monotonic())

    threads = [threading.Thread(target=long_stream) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait(timeout=60)  # every long stream has its first tokens
    sent = time.monotonic()
    stream = client.completions.create(model=server.model, prompt="Hi", max_tokens=2, temperature=0, stream=True)
    first_token = None
    for chunk in stream:
        if first_token is None and chunk.choices and chunk.choices[0].text:
            first_token = time.monotonic()
    for t in threads:
        t.join(timeout=120)
    assert first_token is not None and len(long_done) == 4
    assert first_token < min(long_done), (first_token - sent, min(long_done) - sent)
    print(f"late request: first token {first_token - sent:.2f}s after sending; "
          f"first long stream finished {min(long_done) - sent:.2f}s after")


def _post(server, path: str, body, key: str | None = API_KEY, raw: bytes | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if raw is not None:
        return httpx.post(f"{server.url}{path}", content=raw, headers=headers, timeout=30)
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=30)


def _error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    import openai

    m = server.model
    chat = {"model": m, "messages": CHAT}
    comp = {"model": m, "prompt": "Hi"}
    cases = [  # (path, body, status, field named)
        ("/v1/chat/completions", {"model": m}, 400, "messages"),
        ("/v1/chat/completions", {"model": m, "messages": []}, 400, "messages"),
        ("/v1/completions", {**comp, "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {**comp, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
        ("/v1/completions", {**comp, "temperature": -0.5}, 400, "temperature"),
        ("/v1/completions", {**comp, "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {**comp, "top_p": 1.5}, 400, "top_p"),
        ("/v1/chat/completions", {**chat, "n": 0}, 400, "n"),
        ("/v1/completions", {**comp, "logprobs": 21}, 400, "logprobs"),
        ("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 99}, 400, "top_logprobs"),
        ("/v1/completions", {"model": m, "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {**comp, "prompt": [[1, 2, 10**9]]}, 400, "prompt"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ("/v1/completions", {"model": "no-such-model", "prompt": "Hi"}, 404, "model"),
        ("/v1/completions", {**comp, "prompt": "word " * (MAX_MODEL_LEN + 10)}, 413, "prompt"),
    ]
    for path, body, status, param in cases:
        r = _post(server, path, body)
        assert r.status_code == status, (body, r.status_code, r.text)
        err = _error(r)
        assert err["param"] == param and param.split(".")[0] in err["message"], (body, err)
    r = _post(server, "/v1/completions", None, raw=b'{"model": "x", "prompt": ')
    assert r.status_code == 400 and "JSON" in _error(r)["message"]
    r = httpx.get(f"{server.url}/v1/nope", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert r.status_code == 404 and _error(r)["type"] == "not_found_error"
    for key in ("wrong-key", None):
        r = _post(server, "/v1/completions", comp, key=key)
        assert r.status_code == 401 and _error(r)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").completions.create(model=m, prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        server.client().completions.create(model=m, prompt="Hi", max_tokens=2, top_p=2)
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    # still serving, and /health and /metrics need no key
    ok = server.client().completions.create(model=m, prompt="Hi", max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length") and ok.usage.completion_tokens >= 1
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def _idle(m: dict) -> bool:
    blocks = m.get("qshard_kv_cache_blocks_used", 0)
    return (m["qshard_requests_in_flight"] == 0 and m["qshard_num_requests_running"] == 0
            and m["qshard_num_requests_waiting"] == 0 and m.get("qshard_engine_unfinished", 0) == 0
            and (math.isnan(blocks) or blocks == 0))


def _settled(server, timeout_s: float) -> tuple[float, dict]:
    """(seconds until the engine was idle, the metrics then)."""
    start = time.monotonic()
    while True:
        m = server.metrics()
        if _idle(m) or time.monotonic() - start > timeout_s:
            return time.monotonic() - start, m
        time.sleep(0.05)


def test_a_client_that_disconnects_mid_stream_aborts_its_request(server):
    before = server.metrics()
    body = {"model": server.model, "prompt": "Count: one, two,", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200
        chunks = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks += 1
            if chunks == 3:
                break
    assert server.metrics()["qshard_requests_in_flight"] >= 0
    took, after = _settled(server, 5)
    assert took < 2.0, after  # freed within about a second of the disconnect
    assert after["qshard_request_aborted_total"] == before["qshard_request_aborted_total"] + 1
    generated = after["qshard_generation_tokens_total"] - before["qshard_generation_tokens_total"]
    assert 3 <= generated < 400  # it stopped generating
    ok = server.client().completions.create(model=server.model, prompt="Hi", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_prefix_cache_a_repeated_system_prompt_is_not_prefilled_again(server):
    """Prefix caching seen from the API: the second request with the same long system prompt
    finds its full blocks cached (the engine's prefix-cache hits grow by them), same answer."""
    m = server.metrics()
    if "qshard_engine_prefix_cache_hits" not in m:
        pytest.skip("this engine reports no prefix-cache counters")
    system = "You are a careful assistant. " + " ".join(f"Rule {i}: answer briefly and truthfully." for i in range(30))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}]
    client = server.client()
    answers, hits = [], []
    for _ in range(2):
        before = server.metrics()
        reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=4, temperature=0)
        after = server.metrics()
        answers.append(reply.choices[0].message.content)
        hits.append(after["qshard_engine_prefix_cache_hits"] - before["qshard_engine_prefix_cache_hits"])
        prompt_tokens = reply.usage.prompt_tokens
    block = server.metrics().get("qshard_engine_kv_block_size", 16)
    assert answers[0] == answers[1]
    assert prompt_tokens > 200 and hits[1] >= (prompt_tokens // block - 1) * block > hits[0], (hits, prompt_tokens)
    print(f"prefix cache: {prompt_tokens}-token prompt, cached tokens found {hits[0]:.0f} then {hits[1]:.0f}")


def test_beyond_max_in_flight_is_429_and_closing_every_stream_frees_everything(server):
    """64 open streams fill --max-in-flight: the 65th request gets 429 (the server still answers
    /health); all 64 clients going away at once leave no request, sequence or KV block behind."""
    body = {"model": server.model, "prompt": "Count: one, two,", "max_tokens": 300, "temperature": 0,
            "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def scenario():
        limits = httpx.Limits(max_connections=MAX_IN_FLIGHT + 8)
        async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as client:
            first_chunk = asyncio.Event()
            got = 0

            async def hold_open(release: asyncio.Event):
                nonlocal got
                async with client.stream("POST", f"{server.url}/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    counted = False
                    # keep reading (a dropped line iterator would close the stream), until released
                    async for line in r.aiter_lines():
                        if release.is_set():
                            break
                        if line.startswith("data: {") and not counted:
                            counted, got = True, got + 1
                            if got >= MAX_IN_FLIGHT:
                                first_chunk.set()
                    assert release.is_set(), "a stream ended before the clients left"

            release = asyncio.Event()
            holders = [asyncio.create_task(hold_open(release)) for _ in range(MAX_IN_FLIGHT)]
            await asyncio.wait_for(first_chunk.wait(), 120)
            extra = await client.post(f"{server.url}/v1/completions", json={**body, "stream": False})
            health = await client.get(f"{server.url}/health")
            release.set()
            await asyncio.gather(*holders)
            return extra, health

    extra, health = asyncio.run(scenario())
    assert extra.status_code == 429, extra.text
    assert _error(extra)["code"] == "too_many_requests" and health.status_code == 200
    took, after = _settled(server, 10)
    assert _idle(after) and took < 3.0, (took, after)
    print(f"64 streams closed: engine idle {took:.2f}s later")


def test_metrics_count_what_was_served(server):
    m = server.metrics()
    assert m["qshard_engine_healthy"] == 1
    assert m["qshard_generation_tokens_total"] > 64 * 4  # the burst alone generated more
    assert m["qshard_time_to_first_token_seconds_count"] >= 64
    assert m["qshard_inter_token_latency_seconds_count"] > m["qshard_time_to_first_token_seconds_count"]
    assert m['qshard_time_to_first_token_seconds_bucket{le="+Inf"}'] == m["qshard_time_to_first_token_seconds_count"]
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ("qshard_num_requests_running", "qshard_num_requests_waiting", "qshard_kv_cache_blocks_used",
                 "qshard_prefix_cache_hit_rate", "qshard_generation_tokens_per_second"):
        assert f"# TYPE {name} " in text


def test_bench_serve_against_the_server(server):
    proc = subprocess.run([str(BIN / "qshard"), "bench", "serve", "--url", server.url, "--clients", "3",
                           "--requests", "6", "--max-seconds", "60", "--max-tokens", "8", "--prompt-words", "8,24,64",
                           "--api-key", API_KEY],
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for label in ("requests/s", "output tokens/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"):
        assert label in out, out
    row = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    assert row["completed"] == "6/6", out
    assert float(row["output tokens/s"]) > 0 and float(row["requests/s"]) > 0


def test_a_taken_port_is_an_error_before_the_model_loads():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        start = time.monotonic()
        proc = subprocess.run([str(BIN / "qshard"), "serve", "--model", "default", "--port", str(port)],
                              capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "loading rank" not in proc.stderr and "Traceback" not in proc.stderr
    print(f"taken port refused in {time.monotonic() - start:.1f}s")

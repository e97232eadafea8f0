"""`qshard bench serve`: concurrent streaming clients against a running `qshard serve`.

    qshard bench serve --url http://127.0.0.1:8000 --clients 16 --requests 128 --max-seconds 120

`--clients` streaming clients each send one request after another (prompts of mixed lengths,
launch.bench_prompts) until `--requests` were sent in all or `--max-seconds` passed (requests
still running then are cancelled and left out). Measured on the client side: requests/s, output
tokens/s (tokens from the server's usage counts), time to first token and the inter-token
latency (the gaps between streamed chunks of a request, each divided by the tokens it carried),
p50 and p99. Prints a table; `--json FILE` also writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field

from kernels.errors import InputError
from launch.bench_prompts import LENGTHS_WORDS

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (qshard serve) to measure")
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=64, help="requests in all")
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop sending (and cancel) after this long")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    p.add_argument("--model", default=None, help="model name (default: the first /v1/models lists)")
    p.add_argument("--api-key", default=None, help="the server's API key (default: $QSHARD_API_KEY)")
    p.add_argument("--seed", type=int, default=0, help="which prompts (random.Random(seed) windows)")
    p.add_argument("--prompt-words", default=",".join(map(str, LENGTHS_WORDS)),
                   help="prompt lengths in words, cycled through (default %(default)s)")
    p.add_argument("--ignore-eos", action="store_true", help="every request generates max_tokens")
    p.add_argument("--json", default=None, help="also write the results to this file")


@dataclass
class Result:
    ok: bool
    prompt_chars: int
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def check_arguments(args) -> None:
    for name in ("clients", "requests", "max_tokens"):
        value = getattr(args, name)
        if value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.max_seconds > 0:
        raise InputError(f"--max-seconds must be > 0, got {args.max_seconds}")
    try:
        args.lengths = tuple(int(x) for x in str(args.prompt_words).split(",") if x.strip())
    except ValueError:
        args.lengths = ()
    if not args.lengths or min(args.lengths) < 1:
        raise InputError(f"--prompt-words takes comma-separated positive integers, got {args.prompt_words!r}")
    if not args.url.startswith(("http://", "https://")):
        raise InputError(f"--url must be an http:// or https:// address, got {args.url!r}")


async def _one(client, url: str, model: str, prompt: str, args) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
    result = Result(False, len(prompt))
    sent = time.perf_counter()
    last = None
    tokens_seen = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            result.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
            return result
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result.error = chunk["error"].get("message")
                return result
            now = time.perf_counter()
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"]["completion_tokens"]
                continue
            # chunks carry text; a chunk may hold several tokens (held-back text): count one per chunk
            # here and spread the gaps over the token count from usage at the end
            if any(c.get("text") for c in chunk.get("choices", [])):
                if last is None:
                    result.ttft = now - sent
                else:
                    result.itls.append(now - last)
                last = now
                tokens_seen += 1
    if result.output_tokens > tokens_seen and result.itls:
        # chunks that carried several tokens: the gaps per token, not per chunk
        scale = len(result.itls) / max(1, result.output_tokens - 1)
        result.itls = [gap * scale for gap in result.itls]
    result.ok = result.ttft is not None or result.output_tokens == 0
    return result


async def _bench(args, prompts: list[str], model: str, headers: dict) -> tuple[list[Result], float, int]:
    import httpx

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    results: list[Result] = []
    next_index = 0
    start = time.perf_counter()
    deadline = start + args.max_seconds

    async with httpx.AsyncClient(timeout=httpx.Timeout(args.max_seconds + 30), limits=limits,
                                 headers=headers) as client:
        async def worker():
            nonlocal next_index
            while next_index < args.requests and time.perf_counter() < deadline:
                i = next_index
                next_index += 1
                try:
                    results.append(await _one(client, args.url, model, prompts[i], args))
                except httpx.HTTPError as e:
                    results.append(Result(False, len(prompts[i]), error=f"{type(e).__name__}: {e}"))

        tasks = [asyncio.create_task(worker()) for _ in range(min(args.clients, args.requests))]
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
    return results, time.perf_counter() - start, next_index


def summarize(results: list[Result], elapsed: float, sent: int, args) -> dict:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [x for r in ok for x in r.itls]
    tokens = sum(r.output_tokens for r in ok)
    return {"url": args.url, "clients": args.clients, "sent": sent, "completed": len(ok),
            "failed": len(results) - len(ok), "cancelled": sent - len(results), "elapsed_s": elapsed,
            "requests_per_s": len(ok) / elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "itl_p50_s": percentile(itls, 50), "itl_p99_s": percentile(itls, 99),
            "errors": sorted({r.error for r in results if r.error})[:5]}


def table(s: dict) -> str:
    ms = lambda x: "n/a" if math.isnan(x) else f"{x * 1000:.1f}"  # noqa: E731
    rows = [("server", s["url"]), ("clients", s["clients"]), ("completed", f"{s['completed']}/{s['sent']}"),
            ("failed", s["failed"]), ("cancelled", s["cancelled"]), ("elapsed s", f"{s['elapsed_s']:.2f}"),
            ("requests/s", f"{s['requests_per_s']:.2f}"), ("output tokens", s["output_tokens"]),
            ("output tokens/s", f"{s['output_tokens_per_s']:.1f}"),
            ("TTFT p50 ms", ms(s["ttft_p50_s"])), ("TTFT p99 ms", ms(s["ttft_p99_s"])),
            ("ITL p50 ms", ms(s["itl_p50_s"])), ("ITL p99 ms", ms(s["itl_p99_s"]))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}} : {v}" for k, v in rows)


def run(args) -> int:
    import os

    import httpx

    from launch.bench_prompts import mixed_prompts

    check_arguments(args)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would bury the table
    key = args.api_key or os.environ.get("QSHARD_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    args.url = args.url.rstrip("/")
    try:
        models = httpx.get(f"{args.url}/v1/models", headers=headers, timeout=10)
    except httpx.HTTPError as e:
        raise InputError(f"no server answers at {args.url}: {type(e).__name__}: {e}") from None
    if models.status_code != 200:
        raise InputError(f"{args.url}/v1/models answered {models.status_code}: {models.text[:200]}")
    model = args.model or models.json()["data"][0]["id"]
    prompts = mixed_prompts(args.requests, args.seed, args.lengths)
    logger.info("bench serve: %d requests, %d clients, at most %.0f s, against %s (%s)", args.requests, args.clients,
                args.max_seconds, args.url, model)
    results, elapsed, sent = asyncio.run(_bench(args, prompts, model, headers))
    summary = summarize(results, elapsed, sent, args)
    print(table(summary))
    for error in summary["errors"]:
        print(f"error: {error}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["failed"] == 0 else 1

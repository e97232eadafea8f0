"""/metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Gauges of the engine's state (running and waiting requests, KV-cache blocks, prefix-cache hit
rate) come from `LLMEngine.stats()`; a number the engine does not report reads NaN rather than a
made-up zero. The rest is the engine thread's own bookkeeping (engine.async_engine).
"""

from __future__ import annotations

import math

from engine.async_engine import AsyncEngine, Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# metric -> the keys an engine's stats() may use for it (first found wins)
ENGINE_GAUGES = {
    "qshard_num_requests_running": ("Requests in the running batch", ("running", "num_running")),
    "qshard_num_requests_waiting": ("Requests waiting to be scheduled", ("waiting", "num_waiting")),
    "qshard_kv_cache_blocks_used": ("KV-cache blocks in use", ("kv_blocks_used", "blocks_used", "num_blocks_used",
                                                               "kv_cache_blocks_used")),
    "qshard_kv_cache_blocks_total": ("KV-cache blocks in all", ("kv_blocks_total", "blocks_total", "num_blocks",
                                                                "kv_cache_blocks_total")),
    "qshard_prefix_cache_hit_rate": ("Share of prompt tokens found in the prefix cache",
                                     ("prefix_cache_hit_rate", "prefix_hit_rate")),
}
ENGINE_COUNTERS = {
    "qshard_num_preemptions_total": ("Requests preempted (recomputed later)", ("preemptions", "num_preemptions")),
}


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NaN"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _lookup(stats: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in stats and isinstance(stats[key], (int, float)):
            return stats[key]
    return None


def _metric(lines: list[str], name: str, kind: str, help_text: str, samples: list[tuple[str, object]]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for suffix, value in samples:
        lines.append(f"{name}{suffix} {_number(value)}")


def _histogram(lines: list[str], name: str, help_text: str, hist: Histogram) -> None:
    buckets, total, count = hist.snapshot()
    samples = [(f'_bucket{{le="{bound:g}"}}', n) for bound, n in buckets]
    samples += [('_bucket{le="+Inf"}', count), ("_sum", total), ("_count", count)]
    _metric(lines, name, "histogram", help_text, samples)


def render(engine: AsyncEngine, model: str) -> str:
    m = engine.metrics
    stats = dict(m.engine_stats)
    lines: list[str] = []
    _metric(lines, "qshard_engine_healthy", "gauge", "1 while the engine can run steps",
            [("", int(engine.healthy))])
    _metric(lines, "qshard_requests_in_flight", "gauge", "Requests the server accepted and has not finished",
            [("", engine.in_flight)])
    for name, (help_text, keys) in ENGINE_GAUGES.items():
        _metric(lines, name, "gauge", help_text, [("", _lookup(stats, keys))])
    for name, (help_text, keys) in ENGINE_COUNTERS.items():
        _metric(lines, name, "counter", help_text, [("", _lookup(stats, keys))])
    _histogram(lines, "qshard_time_to_first_token_seconds", "Time from arrival to the first generated token", m.ttft)
    _histogram(lines, "qshard_inter_token_latency_seconds", "Time between a request's generated tokens", m.itl)
    _metric(lines, "qshard_generation_tokens_total", "counter", "Tokens generated", [("", m.generation_tokens)])
    _metric(lines, "qshard_prompt_tokens_total", "counter", "Prompt tokens of accepted requests",
            [("", m.prompt_tokens)])
    _metric(lines, "qshard_generation_tokens_per_second", "gauge", "Tokens generated per second, last 10 s",
            [("", m.tokens_per_second())])
    reasons = sorted(m.finished.items()) or [("stop", 0)]
    _metric(lines, "qshard_request_success_total", "counter", "Requests finished, by finish reason",
            [(f'{{finished_reason="{r}"}}', n) for r, n in reasons])
    _metric(lines, "qshard_request_failure_total", "counter", "Requests that ended with an error", [("", m.failed)])
    _metric(lines, "qshard_request_aborted_total", "counter", "Requests aborted (client gone)", [("", m.aborted)])
    _metric(lines, "qshard_engine_steps_total", "counter", "Engine steps run", [("", m.steps)])
    # whatever else the engine reports, under its own name
    known = {k for _, keys in (*ENGINE_GAUGES.values(), *ENGINE_COUNTERS.values()) for k in keys}
    for key in sorted(stats):
        value = stats[key]
        if key in known or not isinstance(value, (int, float)) or not key.replace("_", "").isalnum():
            continue
        _metric(lines, f"qshard_engine_{key}", "gauge", f"LLMEngine.stats()['{key}']", [("", value)])
    name = model.replace("\\", "\\\\").replace('"', '\\"')
    _metric(lines, "qshard_model_info", "gauge", "The served model", [(f'{{model="{name}"}}', 1)])
    return "\n".join(lines) + "\n"

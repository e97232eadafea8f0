"""Where a CUDA-graph decode step's time goes, measured in the engine's own process.

- GPU time of the step: the captured graph of the batch's bucket replayed back to back, timed
  with CUDA events (its kernels plus the gaps between them inside the graph).
- Its kernels, from one torch.profiler pass over a few replays: quantized matmuls (the Triton
  `quant_matmul_kernel`), dense matmuls (cuBLAS/CUTLASS: the LM head, fp16 layers), decode
  attention, and everything else (norms, rotary, activation, copies), with launches per step.
- Outside the graph: kernels a real decode step runs besides the replay (input upload, sampling,
  read-back), from profiling the engine loop over N decode steps and over the prefill alone.
- Host gap: the engine loop's wall time per decode step minus the GPU time in and outside the
  graph: Python (scheduler, worker, sampler bookkeeping) and synchronisation, the GPU idle. Also
  measured directly: CUDA events around each real step's upload and replay give the GPU's idle
  time between steps (`loop_gap_ms`), and the host time of one replay() call (`launch_host_us`).
- The floor: bytes a step must read (every weight once, the KV cache up to the mean context)
  over the device's copy bandwidth.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

DENSE_MATMUL = ("gemm", "gemv", "cutlass", "nvjet", "xmma", "cublas", "splitkreduce", "sm90_")


QUANT_MATMUL = ("quant_matmul", "dequantize_kernel", "lut_matmul", "codebook")  # Triton kernels of kernels/
ATTENTION = ("decode_attention", "paged_decode")  # the slot and the paged cache's decode kernels


def kernel_kind(name: str) -> str:
    low = name.lower()
    if any(k in low for k in QUANT_MATMUL):
        return "quant_matmul"
    if any(k in low for k in DENSE_MATMUL):
        return "dense_matmul"
    if any(k in low for k in ATTENTION):
        return "attention"
    return "other"


def copy_bandwidth(device: str | torch.device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Bytes per second moved (read + written) by a device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        import time

        began = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        seconds = time.perf_counter() - began
    return 2 * nbytes * repeats / seconds


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors a decode step reads whole: every parameter and buffer once (a tied LM
    head counts its table once), less an untied embedding table and the rotary tables (one row each)."""
    seen, total = set(), 0
    tied = getattr(model, "lm_head", None) is not None and getattr(model.lm_head, "weight", None) is \
        getattr(model.embed_tokens, "weight", None)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("cos", "sin") or (name.startswith("embed_tokens") and not tied):
            continue
        total += t.numel() * t.element_size()
    return total


def kv_bytes_per_position(model: torch.nn.Module, cache) -> int:
    return 2 * cache.num_layers * cache.num_kv_heads * cache.head_dim * torch.empty(0, dtype=cache.dtype).element_size()


def kernel_ms(fn, exclude: frozenset[str] = frozenset()) -> float | None:
    """Summed duration (ms) of the CUDA kernels and copies `fn` launches whose names are not in
    `exclude`, from one profiler pass (None if it saw no device work at all)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not events:
        return None
    return sum(e.time_range.elapsed_us() for e in events if e.name not in exclude) / 1e3


def _graph(worker, batch: int):
    """The captured graph that serves `batch` sequences and its bucket size, or (None, 0)."""
    graphs = getattr(worker, "graphs", None)
    if graphs is None or not graphs.can_run(batch):
        return None, 0
    size = next(s for s in sorted(graphs.graphs) if s >= batch)
    return graphs.graphs[size], size


def graph_gpu_ms(worker, batch: int, context: int, replays: int = 50) -> float | None:
    """GPU time of one decode step (the graph serving `batch` sequences replayed back to back, CUDA
    events), every sequence at `context` positions (the run's mean: attention's share grows with
    it). None without graphs."""
    graph, size = _graph(worker, batch)
    if graph is None:
        return None
    # the static inputs still hold the run's last step; a real step overwrites all of them again
    worker.graphs.positions[:size] = context - 1
    worker.graphs.kv_lens[:size] = context
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def graph_kernels(worker, batch: int, gpu_ms: float, profiled: int = 5) -> dict:
    """The graph's kernels by kind (ms per step) from one profiler pass over a few replays, the
    gaps between them inside the graph (gpu_ms less their sum), launches per step, the largest
    "other" kernels, and the kernels' names (kernel_names)."""
    graph, _ = _graph(worker, batch)
    out: dict = {}
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(profiled):
                graph.replay()
            torch.cuda.synchronize()
        times = {"quant_matmul": 0.0, "dense_matmul": 0.0, "attention": 0.0, "other": 0.0}
        others: dict[str, float] = {}
        launches = 0
        names = set()
        for e in prof.events():
            if e.device_type != DeviceType.CUDA:
                continue
            names.add(e.name)
            us = e.time_range.elapsed_us()
            kind = kernel_kind(e.name)
            times[kind] += us
            launches += 1
            if kind == "other":
                others[e.name] = others.get(e.name, 0.0) + us
        if launches == 0:
            out["profile_error"] = "the profiler saw no kernels inside the graph replays"
            return out
        per = 1e-3 / profiled  # us over `profiled` replays -> ms per step
        out.update({f"{k}_ms": v * per for k, v in times.items()})
        out["kernels_ms"] = sum(times.values()) * per
        out["in_graph_gaps_ms"] = max(0.0, gpu_ms - out["kernels_ms"])
        out["launches_per_step"] = launches / profiled
        top = sorted(others.items(), key=lambda kv: -kv[1])[:8]
        out["top_other_kernels"] = [{"name": n[:90], "ms_per_step": v * per} for n, v in top]
        out["kernel_names"] = sorted(names)  # what a replay runs (the caller tells outside work by it)
    except Exception as e:  # the breakdown is a report, never a reason to lose the throughput figure
        logger.warning("profiling the decode graph failed: %s", e)
        out["profile_error"] = f"{type(e).__name__}: {e}"
    return out


def host_profile(fn, steps: int, baseline=None, top: int = 15) -> list[dict]:
    """The functions where the host spends a decode step: cProfile over `fn`, which runs `steps`
    decode steps, less one over `baseline` (the same call without the decode steps: prefill and the
    call's own setup), per step. The profiler's own cost inflates every figure: read a ranking."""
    import cProfile
    import pstats

    def own_times(f) -> dict:
        prof = cProfile.Profile()
        prof.enable()
        f()
        prof.disable()
        return {key: (calls, own, cum) for key, (_, calls, own, cum, _) in pstats.Stats(prof).stats.items()}

    with_steps = own_times(fn)
    base = own_times(baseline) if baseline is not None else {}
    rows = []
    for key, (calls, own, cum) in with_steps.items():
        b_calls, b_own, b_cum = base.get(key, (0, 0.0, 0.0))
        rows.append((key, (calls - b_calls) / steps, (own - b_own) / steps, (cum - b_cum) / steps))
    rows.sort(key=lambda r: -r[2])  # by own time
    return [{"function": f"{path.rsplit('/', 1)[-1]}:{line}({name})", "calls_per_step": calls,
             "own_us_per_step": 1e6 * own, "cum_us_per_step": 1e6 * cum}
            for (path, line, name), calls, own, cum in rows[:top]]


def loop_timeline(worker, fn) -> dict | None:
    """GPU time of each real decode step (its input upload and replay, CUDA events the graphs record
    while `fn` runs the engine loop) and the GPU's idle time between one step's end and the next's
    start: the host gap measured directly, at the loop's own contexts; and the decode step on the
    GPU's clock (first step's start to last step's end, over the steps): unlike the wall clock of a
    run less a separately timed prefill, it is exact at every batch size. None without graphs."""
    graphs = getattr(worker, "graphs", None)
    if graphs is None:
        return None
    graphs.step_events = []
    try:
        fn()
        torch.cuda.synchronize()
        events = graphs.step_events
    finally:
        graphs.step_events = None
    if len(events) < 3:
        return None
    busy = [b.elapsed_time(e) for b, e in events[1:]]
    idle = [events[i - 1][1].elapsed_time(events[i][0]) for i in range(2, len(events))]
    span = events[1][0].elapsed_time(events[-1][1])  # the decode steps back to back, gaps included
    busy.sort()
    idle.sort()
    return {"loop_steps": len(events), "loop_step_ms": span / (len(events) - 1),
            "loop_gpu_step_ms": sum(busy) / len(busy),
            "loop_gap_ms": sum(idle) / len(idle), "loop_gap_median_ms": idle[len(idle) // 2]}


def launch_host_us(worker, batch: int, calls: int = 20) -> float | None:
    """Host time of one `replay()` call of the batch's graph (the GPU idle meanwhile), median."""
    import time

    graph, _ = _graph(worker, batch)
    if graph is None:
        return None
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t = time.perf_counter()
        graph.replay()
        times.append(1e6 * (time.perf_counter() - t))
    torch.cuda.synchronize()
    return sorted(times)[calls // 2]


def floor(worker, batch: int, mean_context: float, bandwidth: float) -> dict:
    """The bandwidth floor of one decode step at `batch` sequences of `mean_context` positions."""
    w = weight_bytes(worker.model)
    kv = kv_bytes_per_position(worker.model, worker.cache) * batch * mean_context
    step_ms = 1e3 * (w + kv) / bandwidth
    return {"weight_bytes": w, "kv_bytes": kv, "copy_bandwidth_bytes_per_s": bandwidth, "floor_step_ms": step_ms,
            "floor_tokens_per_s": batch / step_ms * 1e3}

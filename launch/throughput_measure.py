"""One throughput measurement in this process: qshard at one (TP size, executor, dtype), or HF
transformers' `generate` on the same prompts. The bench runs each in a fresh process (or a
fresh torchrun job) so that memory peaks and thread settings of one never leak into another.

Prompts are token ids of a fixed length drawn from a seeded generator, generation is greedy
with EOS ignored, so every configuration produces exactly batch × output_len tokens. A short
warm-up generation at each batch size runs first and is not timed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

import torch

logger = logging.getLogger(__name__)

MIB = 2**20


def make_prompts(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` token ids, avoiding the low ids where special tokens live."""
    low = min(100, vocab_size // 4)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (count, length), generator=g).tolist()


def token_digest(token_ids: list[list[int]]) -> str:
    return hashlib.sha1(repr(token_ids).encode()).hexdigest()[:12]


def _per_step(stats: list[dict], name: str, steps: int) -> list[tuple[float, float]]:
    """(ms per step, calls per step) of collective `name` on each rank."""
    out = []
    for s in stats:
        c = s.get("collectives", {}).get(name, {"seconds": 0.0, "calls": 0})
        out.append((1000 * c["seconds"] / max(steps, 1), c["calls"] / max(steps, 1)))
    return out


def measure_qshard(model_dir: str, *, tp: int, executor: str, dtype: str, device: str, batches: list[int],
                   input_len: int, output_len: int, seed: int = 0, load_format: str = "auto",
                   executor_options: dict | None = None, kernels: str = "auto") -> dict | None:
    """Rows of tokens/s, memory and collective time per batch size; None on SPMD follower ranks.
    `executor_options` are further LLM keyword arguments (executor options, cuda_graphs); `kernels`
    is the engine option for the layers' non-matmul work. In-process (executor uni) on CUDA, each
    row also breaks the decode step down (launch.step_breakdown)."""
    from engine import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model_dir, tensor_parallel_size=tp, executor=executor, dtype=dtype, device=device,
              max_num_seqs=max(batches), max_num_batched_tokens=max(8192, max(batches) * input_len),
              max_model_len=input_len + output_len + 16, load_format=load_format, progress=False, seed=seed,
              kernels=kernels, **(executor_options or {}))
    with llm:
        load_s = time.perf_counter() - start
        ex = llm.executor
        prompts = make_prompts(llm.model_config.vocab_size, max(batches), input_len, seed)
        warm = SamplingParams(max_tokens=min(4, output_len), temperature=0, ignore_eos=True)
        for b in batches:
            llm.generate(prompts[:b], warm)
        load_stats = ex.collect_stats(reset=True)
        params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
        worker = getattr(ex, "worker", None)  # in-process only
        breakdown = worker is not None and worker.ctx.device.type == "cuda" and output_len > 1
        bandwidth = None
        if breakdown:
            from launch import step_breakdown

            bandwidth = step_breakdown.copy_bandwidth(worker.ctx.device)
        rows = []
        for b in batches:
            steps_before = ex.steps_run
            t = time.perf_counter()
            outs = llm.generate(prompts[:b], params)
            elapsed = time.perf_counter() - t
            stats = ex.collect_stats(reset=True)
            steps = ex.steps_run - steps_before
            if ex.is_follower:
                continue
            tokens = sum(len(o.token_ids) for o in outs)
            reduce, gather = _per_step(stats, "all_reduce", steps), _per_step(stats, "all_gather", steps)
            ranks = [{"rank": s["rank"], "pid": s["pid"], "device": s["device"],
                      "peak_memory_mib": (s["peak_memory_bytes"] or 0) / MIB,
                      "memory_mib": (s["memory_bytes"] or 0) / MIB,
                      "all_reduce_ms_per_step": reduce[i][0], "all_reduce_calls_per_step": reduce[i][1],
                      "all_gather_ms_per_step": gather[i][0]} for i, s in enumerate(stats)]
            rows.append({"tp": tp, "batch": b, "kernels": kernels, "async_scheduling": llm.engine.async_scheduling,
                         "breakdown": None,
                         "tokens": tokens, "elapsed_s": elapsed,
                         "tokens_per_s": tokens / elapsed, "steps": steps, "step_ms": 1000 * elapsed / max(steps, 1),
                         "all_reduce_ms_per_step": reduce[0][0] if reduce else 0.0,
                         "peak_memory_mib_max": max(r["peak_memory_mib"] for r in ranks) if ranks else 0.0,
                         "ranks": ranks, "tokens_digest": token_digest([o.token_ids for o in outs])})
            logger.info("tp=%d batch=%d: %.1f tokens/s (%d steps, %.1f ms/step)", tp, b, tokens / elapsed, steps,
                        1000 * elapsed / max(steps, 1))
        if ex.is_follower:
            return None
        if breakdown:  # after every timed run, and the profilers (which slow launches after them) last
            for row in rows:
                row["breakdown"] = _timings(llm, worker, prompts[:row["batch"]], row, input_len, output_len,
                                            bandwidth)
            for row in rows:
                _profiles(llm, worker, prompts[:row["batch"]], row)
        return {"tp": tp, "executor": llm.executor_name, "dtype": str(llm.config.dtype).replace("torch.", ""),
                "device": llm.config.device, "load_s": load_s,
                "load_peak_memory_mib": [(s["peak_memory_bytes"] or 0) / MIB for s in load_stats],
                "rows": rows}


def _timings(llm, worker, prompts, row: dict, input_len: int, output_len: int, bandwidth: float) -> dict:
    """The decode step of one row, without profilers: its wall time (the prefill step timed apart
    and taken out), the graph's GPU time, the host gap between them, the GPU's idle time between
    real steps (CUDA events over a run like the timed one), the host time of one replay() call,
    and the bandwidth floor."""
    from engine import SamplingParams
    from launch import step_breakdown

    b, steps = row["batch"], row["steps"]
    t = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    prefill_s = time.perf_counter() - t
    decode_ms = 1000 * (row["elapsed_s"] - prefill_s) / max(steps - 1, 1)
    out = {"prefill_s": prefill_s, "decode_step_ms": decode_ms, "decode_tokens_per_s": b / decode_ms * 1e3}
    mean_context = int(input_len + output_len / 2)
    try:
        timeline = step_breakdown.loop_timeline(worker, lambda: llm.generate(prompts, SamplingParams(
            max_tokens=output_len, temperature=0, ignore_eos=True)))
        if timeline is not None:
            out.update(timeline)
            out["loop_tokens_per_s"] = b / timeline["loop_step_ms"] * 1e3
        out["launch_host_us"] = step_breakdown.launch_host_us(worker, b)
    except Exception as e:  # a report, never a reason to lose the row
        out["timeline_error"] = f"{type(e).__name__}: {e}"
    gpu_ms = step_breakdown.graph_gpu_ms(worker, b, mean_context)
    if gpu_ms is not None:
        out["gpu_step_ms"] = gpu_ms
        out["host_gap_ms"] = decode_ms - gpu_ms
    fl = step_breakdown.floor(worker, b, mean_context, bandwidth)
    out.update(fl)
    out["share_of_floor"] = fl["floor_step_ms"] / decode_ms
    return out


def _profiles(llm, worker, prompts, row: dict) -> None:
    """Profiler figures of one row, into its breakdown: the graph's kernels by kind, GPU work of a
    real step outside the graph (taken out of the host gap), and at batch 1 a host profile."""
    from engine import SamplingParams
    from launch import step_breakdown

    out, b = row["breakdown"], row["batch"]
    if "gpu_step_ms" not in out:
        return
    kernels = step_breakdown.graph_kernels(worker, b, out["gpu_step_ms"])
    in_graph = frozenset(kernels.pop("kernel_names", ()))
    out.update(kernels)
    n = 8
    try:  # device work of a real step that is not the replay's: n decode steps less the prefill alone
        alone = step_breakdown.kernel_ms(lambda: llm.generate(prompts, SamplingParams(
            max_tokens=1, temperature=0, ignore_eos=True)), exclude=in_graph)
        with_decode = step_breakdown.kernel_ms(lambda: llm.generate(prompts, SamplingParams(
            max_tokens=1 + n, temperature=0, ignore_eos=True)), exclude=in_graph)
        if alone is not None and with_decode is not None and in_graph:
            out["outside_graph_gpu_ms"] = max(0.0, (with_decode - alone) / n)
            out["host_gap_ms"] -= out["outside_graph_gpu_ms"]
    except Exception as e:  # a report, never a reason to lose the row
        out["profile_error"] = f"loop profile: {type(e).__name__}: {e}"
    if b == 1:  # where the host's share of a step goes
        steps = 32
        out["host_profile"] = step_breakdown.host_profile(
            lambda: llm.generate(prompts, SamplingParams(max_tokens=1 + steps, temperature=0, ignore_eos=True)),
            steps, baseline=lambda: llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0,
                                                                           ignore_eos=True)))


def measure_hf(model_dir: str, *, dtype: str, device: str, batches: list[int], input_len: int, output_len: int,
               seed: int = 0, load_format: str = "auto") -> dict:
    """HF transformers' greedy `generate` on the same prompts (random init for dummy shapes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.config import ModelConfig, parse_dtype

    torch_dtype = parse_dtype(dtype)
    cfg = ModelConfig.from_dir(model_dir)
    if load_format == "dummy":
        if cfg.quantization_config:
            return {"skipped": "HF has no random-init path for a quantized dummy shape"}
        from engine.dummy import parameter_count

        need = parameter_count(cfg) * torch.finfo(torch_dtype).bits // 8
        free = (torch.cuda.mem_get_info()[0] if device == "cuda" else
                os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        if need > 0.6 * free:
            return {"skipped": f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"}
        hf_cfg = AutoConfig.from_pretrained(model_dir)
        with torch.device(device):  # random init where it will run (a 7B init on CPU takes minutes)
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    model = model.to(device).eval()
    prompts = make_prompts(cfg.vocab_size, max(batches), input_len, seed)
    pad = cfg.raw.get("pad_token_id")
    pad = pad if isinstance(pad, int) else (cfg.eos_token_ids[0] if cfg.eos_token_ids else 0)

    def run(b: int, new: int) -> None:
        ids = torch.tensor(prompts[:b], device=device)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=pad)
        if device == "cuda":
            torch.cuda.synchronize()

    for b in batches:
        run(b, min(4, output_len))
    rows = []
    for b in batches:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        run(b, output_len)
        elapsed = time.perf_counter() - t
        from engine.executor.stats import peak_memory_bytes

        rows.append({"batch": b, "tokens": b * output_len, "elapsed_s": elapsed,
                     "tokens_per_s": b * output_len / elapsed,
                     "peak_memory_mib": (peak_memory_bytes(torch.device(device)) or 0) / MIB})
        logger.info("HF batch=%d: %.1f tokens/s", b, b * output_len / elapsed)
    import transformers

    return {"dtype": dtype, "device": device, "transformers": transformers.__version__, "rows": rows}

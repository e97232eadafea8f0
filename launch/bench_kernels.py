"""`qshard bench kernels`: the quantized linear (kernels.prepare/linear) against dense baselines.

For each linear shape, weight format and batch size M it times the dispatched backend and reports
bytes moved (packed weight + scales/zeros + x + y), GB/s, the share of a device-to-device copy's
bandwidth measured in the same run, and speedups over F.linear on the dequantized weight (bf16 and
fp16 on CUDA; bf16 and float32 on CPU) and over "dequantize then matmul" per call. Weights rotate
through enough copies to exceed the last-level cache (real layers stream from memory), unless
--hot. Figures are comparable only within one run. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
from kernels import reference

# fused projections at tensor-parallel size 1: (layer, K, N)
MODEL_SHAPES = {
    "llama-2-7b": [("qkv", 4096, 12288), ("o", 4096, 4096), ("gate_up", 4096, 22016), ("down", 11008, 4096)],
    "llama-2-70b": [("qkv", 8192, 10240), ("o", 8192, 8192), ("gate_up", 8192, 57344), ("down", 28672, 8192)],
    # one rank's shards at tensor-parallel size 4 (qkv/gate_up split along N, o/down along K)
    "llama-2-70b-tp4": [("qkv", 8192, 2560), ("o", 2048, 8192), ("gate_up", 8192, 14336), ("down", 7168, 8192)],
    "llama-3-8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)],
    "square-2048": [("square", 2048, 2048)],
}
M_ALL = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FORMATS = {  # name -> (kind, bits, group_size, sym, act_order)
    "gptq4": ("gptq", 4, 128, True, False),
    "gptq4-act": ("gptq", 4, 128, False, True),
    "gptq4-asym": ("gptq", 4, 128, False, False),  # gptq4-act's plain-order twin (the act-order cost alone)
    "gptq4-act-sym": ("gptq", 4, 128, True, True),  # gptq4's act-order twin
    "gptq4-ch": ("gptq", 4, -1, True, False),
    "awq4": ("awq", 4, 128, False, False),
    "gptq8": ("gptq", 8, 128, True, False),
    "gptq8-ch": ("gptq", 8, -1, True, False),
    "gptq3": ("gptq", 3, 128, False, False),
    "int8": ("int8", 8, -1, True, False),
    "fp8": ("fp8", 8, -1, True, False),
    "nf4": ("lut4", 4, 64, True, False),  # bitsandbytes nf4, blocksize 64 (kernels.lut_matmul)
    "aqlm-2x8": ("codebook", 2, 8, True, False),  # AQLM 2 codebooks x 8 bits, in-groups of 8 (kernels.codebook_matmul)
}
CPU_DEFAULTS = dict(models=["square-2048"], m=[1, 16], formats=["gptq4", "awq4", "gptq8", "int8"])
CUDA_DEFAULTS = dict(models=["llama-2-7b", "llama-2-70b", "llama-3-8b"], m=list(M_ALL),
                     formats=["gptq4", "gptq4-act", "awq4", "int8", "fp8"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--models", nargs="+", choices=sorted(MODEL_SHAPES), default=None,
                        help="shape sets (default on CPU: square-2048, i.e. K=N=2048; on CUDA: the three Llamas)")
    parser.add_argument("--layers", nargs="+", default=None, help="only these layers (qkv, o, gate_up, down, square)")
    parser.add_argument("--m", nargs="+", type=int, default=None,
                        help=f"batch sizes (default on CPU: 1 16; on CUDA: {' '.join(map(str, M_ALL))})")
    parser.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=None,
                        help="weight formats (default on CPU: gptq4 awq4 gptq8 int8; on CUDA: gptq4 gptq4-act awq4 "
                             "int8 fp8)")
    parser.add_argument("--full", action="store_true",
                        help="on CPU too: every model shape and M (slow: minutes per shape on 2 cores)")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="activation dtype (CPU: bf16)")
    parser.add_argument("--backend", default="auto", choices=kernels.BACKENDS,
                        help="kernel backend (default: what the engine picks; e.g. cpu-int4 for torch's op)")
    parser.add_argument("--hot", action="store_true",
                        help="reuse one weight (cache-resident) instead of rotating copies")
    parser.add_argument("--no-dequant-baseline", action="store_true",
                        help="skip the slow dequantize-then-matmul timing")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds of timing per measurement (default 0.2 on CPU, 0.05 on CUDA)")
    parser.add_argument("--sweep", action="store_true",
                        help="CUDA: also time every candidate Triton config per row, and the variants not yet "
                             "timed on a GPU that the tuner leaves out (prints them; in the JSON)")
    parser.add_argument("--json", default="bench_kernels_{device}.json", help="output path ('' for none)")


def check_arguments(args) -> None:
    """Refuse bad flags (one `error:` line from `qshard`) before any measurement."""
    from kernels.errors import InputError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible "
                         f"({'torch has no CUDA build' if not torch.backends.cuda.is_built() else 'no GPU found'})")
    known_layers = sorted({layer for shapes in MODEL_SHAPES.values() for layer, _, _ in shapes})
    for layer in args.layers or []:
        if layer not in known_layers:
            raise InputError(f"--layers {layer!r} is not a layer name; known: {', '.join(known_layers)}")
    for m in args.m or []:
        if m < 1:
            raise InputError(f"--m {m}: batch rows must be >= 1")
    if args.min_time is not None and not args.min_time > 0:
        raise InputError(f"--min-time must be > 0 seconds, got {args.min_time}")


def run(args) -> int:
    check_arguments(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    full = device.type == "cuda" or args.full
    models = args.models or (CUDA_DEFAULTS["models"] if full and device.type == "cpu" else defaults["models"])
    ms = args.m or (list(M_ALL) if full else defaults["m"])
    formats = args.formats or defaults["formats"]
    act = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    min_time = args.min_time or (0.05 if device.type == "cuda" else 0.2)
    timer = CudaTimer(min_time) if device.type == "cuda" else CpuTimer(min_time)

    copy_gbs = copy_bandwidth(device, timer)
    print(f"device: {describe(device)}; activations {act}; copy bandwidth {copy_gbs:.1f} GB/s (read + write); "
          f"{'hot' if args.hot else 'cold (rotating copies)'} weights")
    rows = []
    for model in models:
        for layer, K, N in MODEL_SHAPES[model]:
            if args.layers and layer not in args.layers:
                continue
            for fmt in formats:
                rows += bench_layer(model, layer, K, N, fmt, ms, act, device, timer, copy_gbs, args)
    print_table(rows, device)
    if args.json:
        path = args.json.format(device=device.type)
        with open(path, "w") as f:
            json.dump({"device": describe(device), "act_dtype": str(act), "copy_gbs": copy_gbs, "rows": rows}, f,
                      indent=1)
        print(f"wrote {path}")
    return 0


# ---- timing ----
class CpuTimer:
    def __init__(self, min_time: float):
        self.min_time = min_time

    def __call__(self, fn) -> float:
        """Median seconds per call over ~min_time, after warm-up."""
        fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        reps = max(1, min(1000, int(self.min_time / once / 5)))
        samples = [once]
        for _ in range(5 if once < self.min_time else 2):
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            samples.append((time.perf_counter() - start) / reps)
        return statistics.median(samples)


class CudaTimer:
    """Per-call GPU time from a CUDA graph of many calls (no launch overhead in the figure)."""

    def __init__(self, min_time: float):
        self.min_time = min_time

    def __call__(self, fn) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the graph: compiles and tunes
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        once = max(start.elapsed_time(end) / 1e3, 1e-6)
        reps = max(5, min(200, int(self.min_time / once)))
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(reps):
                    fn()
            replay = graph.replay
        except Exception:  # a baseline that cannot be captured is timed by plain launches
            torch.cuda.synchronize()

            def replay():
                for _ in range(reps):
                    fn()
        replay()
        samples = []
        for _ in range(5):
            start.record()
            replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / reps)
        return statistics.median(samples)


def copy_bandwidth(device: torch.device, timer) -> float:
    n = (1 << 30 if device.type == "cuda" else 128 << 20) // 4  # several times the last-level cache
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / t / 1e9


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _cpu_last_level_cache() -> int | None:
    """Bytes of the largest CPU cache sysfs reports (Linux), else None."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=None)


def cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return _cpu_last_level_cache() or 32 << 20


# ---- one layer ----
def bench_layer(model, layer, K, N, fmt, ms, act, device, timer, copy_gbs, args) -> list[dict]:
    layout = random_layout(fmt, K, N, device)
    prepared = kernels.prepare(layout, act, backend=args.backend, keep_layout=False)
    weight_bytes = sum(b.numel() * b.element_size() for b in prepared.buffers())
    dense = reference.dequantize(layout).to(act)
    # rotating copies whose total exceeds the last-level cache (3x, at most 1 GiB: a VM's share of a
    # large L3 is smaller than sysfs says): every weight streams from memory, quantized and dense alike
    def copies(nbytes: int) -> int:
        return 1 if args.hot else max(1, math.ceil(min(3 * cache_bytes(device), 1 << 30) / nbytes))

    quantized = [prepared] + [kernels.prepare(random_layout(fmt, K, N, device), act, backend=args.backend,
                                              keep_layout=False)
                              for _ in range(copies(weight_bytes) - 1)]
    dense_copies = [dense] + [torch.randn_like(dense) for _ in range(copies(dense.numel() * 2) - 1)]
    dense_f32 = None
    if device.type == "cpu":
        dense_f32 = [d.float() for d in dense_copies]
    tiny = tinygemm_copies(fmt, K, N, device, act, copies(K * N // 2))
    rows = []
    for M in ms:
        x = torch.randn(M, K, device=device).to(act)
        it = {"q": 0, "d": 0, "t": 0}

        def rotating(items, key):
            i = it[key] = (it[key] + 1) % len(items)
            return items[i]

        t_q = timer(lambda: kernels.linear(x, rotating(quantized, "q")))
        t_dense = timer(lambda: F.linear(x, rotating(dense_copies, "d")))
        row = dict(model=model, layer=layer, K=K, N=N, format=fmt, M=M, backend=prepared.backend,
                   time_us=t_q * 1e6, bytes=weight_bytes + (M * K + M * N) * x.element_size())
        row["gbs"] = row["bytes"] / t_q / 1e9
        row["pct_copy"] = 100 * row["gbs"] / copy_gbs
        row[f"dense_{short(act)}_us"] = t_dense * 1e6
        row[f"vs_{short(act)}"] = t_dense / t_q
        if device.type == "cuda":
            other = torch.float16 if act == torch.bfloat16 else torch.bfloat16
            x2, d2 = x.to(other), [d.to(other) for d in dense_copies[:1]]
            t_other = timer(lambda: F.linear(x2, d2[0]))  # one copy: a second dtype's copies would not fit
            row[f"dense_{short(other)}_us"] = t_other * 1e6
            row[f"vs_{short(other)}"] = t_other / t_q
        else:
            xf = x.float()
            it["d"] = 0
            t_f32 = timer(lambda: F.linear(xf, rotating(dense_f32, "d")))
            row["dense_fp32_us"] = t_f32 * 1e6
            row["vs_fp32"] = t_f32 / t_q
        if tiny is not None and M <= 512:
            packed, scales_zeros, group = tiny
            it["t"] = 0
            t_tiny = timer(lambda: torch._weight_int4pack_mm(x, rotating(packed, "t"), group, scales_zeros))
            row["tinygemm_us"] = t_tiny * 1e6
            row["vs_tinygemm"] = t_tiny / t_q
        if prepared.backend == "triton" and hasattr(prepared, "choose_config"):  # the LUT4 kernel has no tuner
            row["config"] = asdict(prepared.choose_config(M, device))
            if args.sweep:
                row["sweep"] = sweep_configs(quantized, x, timer, row["bytes"])
        if not args.no_dequant_baseline:
            t_dq = timer(lambda: F.linear(x, reference.dequantize(layout, act)))
            row["dequant_mm_us"] = t_dq * 1e6
            row["vs_dequant_mm"] = t_dq / t_q
        rows.append(row)
        print(f"  {model} {layer} {fmt} M={M}: {row['time_us']:.1f} us ({prepared.backend}), "
              f"{row[f'vs_{short(act)}']:.2f}x {short(act)} F.linear", flush=True)
    return rows


def tinygemm_copies(fmt: str, K: int, N: int, device: torch.device, act: torch.dtype, n: int):
    """torch's tinygemm (`_weight_int4pack_mm`, gpt-fast's and torchao's int4 kernel) on the same shape:
    (packed weight copies, scales-and-zeros, group size), or None where it does not apply (CUDA, bf16,
    4-bit groups only). Random codes: only its time is compared."""
    kind, bits, group, _, _ = FORMATS[fmt]
    if device.type != "cuda" or act != torch.bfloat16 or kind not in ("gptq", "awq") or bits != 4 or group == -1:
        return None
    gen = torch.Generator(device="cpu").manual_seed(K + N)
    try:
        packed = [torch._convert_weight_to_int4pack(
            torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen).to(device), 8) for _ in range(n)]
    except (RuntimeError, TypeError) as exc:  # an older torch wants int32 codes, or no kernel on this GPU
        print(f"  tinygemm skipped: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return None
    scales_zeros = (torch.rand(K // group, N, 2, generator=gen) / 64).to(torch.bfloat16).to(device)
    return packed, scales_zeros, group


def sweep_configs(quantized: list, x: torch.Tensor, timer, nbytes: int) -> list[dict]:
    """Every candidate config of the tuner for this row, timed the same way (rotating weights)."""
    from kernels import triton_configs

    first = quantized[0]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    out = []
    for cfg in triton_configs.candidates(x.shape[0], first.out_features, first.in_features, first.spec.per_word, sms,
                                         untimed=True, permuted=first.spec.has_perm):
        it = [0]

        def call():
            it[0] = (it[0] + 1) % len(quantized)
            return quantized[it[0]].matmul(x, config=cfg)

        try:
            t = timer(call)
        except Exception as exc:  # a config the compiler rejects
            print(f"    {cfg}: failed ({type(exc).__name__})")
            continue
        out.append(dict(config=asdict(cfg), time_us=t * 1e6, gbs=nbytes / t / 1e9))
        print(f"    {cfg}: {t * 1e6:.1f} us, {nbytes / t / 1e9:.0f} GB/s")
    return out


def short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def random_layout(fmt: str, K: int, N: int, device: torch.device):
    """A layout of random codes: every int32 word is a valid set of packed codes."""
    kind, bits, group, sym, act_order = FORMATS[fmt]
    gen = torch.Generator(device="cpu").manual_seed(K * 31 + N)

    def words(*shape):
        return torch.randint(-2 ** 31, 2 ** 31 - 1, shape, dtype=torch.int32, generator=gen).to(device)

    from kernels.packing import packed_size

    if kind in ("gptq", "awq"):
        group = K if group == -1 else group
        G = -(-K // group)
        scales = ((torch.rand(G, N, generator=gen) + 0.5) / 2 ** bits / math.sqrt(K)).to(torch.float16).to(device)
        if kind == "awq":
            return kernels.AWQLayout(qweight=words(K, packed_size(N, 4)), scales=scales,
                                     qzeros=words(G, packed_size(N, 4)), group_size=group, in_features=K,
                                     out_features=N)
        g_idx = None
        if act_order:
            g_idx = (torch.arange(K) // group)[torch.randperm(K, generator=gen)].to(torch.int32).to(device)
        return kernels.GPTQLayout(qweight=words(packed_size(K, bits), N), scales=scales,
                                  qzeros=None if sym else words(G, packed_size(N, bits)), g_idx=g_idx, bits=bits,
                                  group_size=group, in_features=K, out_features=N)
    if kind == "lut4":
        codes = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen).to(device)
        absmax = (torch.rand(N, K // group, generator=gen) + 0.5) / math.sqrt(K)
        table = torch.tensor([-1.0, -0.696, -0.525, -0.395, -0.284, -0.185, -0.091, 0.0, 0.080, 0.161, 0.246, 0.338,
                              0.441, 0.563, 0.723, 1.0])  # NF4's values, rounded
        return kernels.layouts.LUT4Layout(codes, absmax.to(device), table.to(device), group)
    if kind == "codebook":  # bits: codebooks of 2**8 vectors; group: the vectors' width along K
        from kernels.layouts import CodebookBlock, CodebookLayout, CodebookPart

        books, width = bits, group
        codes = torch.randint(0, 256, (N, K // width, books), dtype=torch.int32, generator=gen).to(device)
        codebooks = (torch.randn(1, books, 256, 1, width, generator=gen) / math.sqrt(K)).to(device)
        part = CodebookPart(codes, codebooks, (torch.rand(N, generator=gen) + 0.5).to(device), group_cols=K,
                            k_offset=0, out_skip=0, out_features=N, in_features=K)
        return CodebookLayout((CodebookBlock((part,)),))
    if kind == "int8":
        w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen).to(device)
        return kernels.Int8Layout(weight=w, scales=(torch.rand(N, generator=gen) / 128 / math.sqrt(K)).to(device))
    w = (torch.randn(N, K, generator=gen) * 16).to(torch.float8_e4m3fn).to(device)
    return kernels.FP8Layout(weight=w, scales=(torch.rand(N, generator=gen) / 16 / math.sqrt(K)).to(device))


def print_table(rows: list[dict], device: torch.device) -> None:
    if not rows:
        return
    ratio_cols = list(dict.fromkeys(k for r in rows for k in r if k.startswith("vs_")))
    head = (f"{'model':12s} {'layer':8s} {'K':>6s} {'N':>6s} {'format':10s} {'M':>4s} {'backend':9s} {'us':>9s} "
            f"{'MB':>7s} {'GB/s':>7s} {'%copy':>6s} " + " ".join(f"{c.replace('vs_', 'x') :>10s}" for c in ratio_cols))
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:12s} {r['layer']:8s} {r['K']:6d} {r['N']:6d} {r['format']:10s} {r['M']:4d} "
              f"{r['backend']:9s} {r['time_us']:9.1f} {r['bytes'] / 1e6:7.2f} {r['gbs']:7.1f} {r['pct_copy']:6.1f} "
              + " ".join(f"{r.get(c, math.nan):10.2f}" for c in ratio_cols))
    print("x<baseline>: baseline time / quantized time (higher is better); %copy: GB/s over this run's "
          f"{device.type} copy bandwidth")


if __name__ == "__main__":
    import sys

    p = argparse.ArgumentParser(prog="bench_kernels", description=__doc__)
    add_arguments(p)
    sys.exit(run(p.parse_args()))

"""A decode layer's non-matmul work, torch path against the fused kernels, per call inside a CUDA
graph (as the engine replays them), at one model shape and several batch sizes.

Each variant is captured 20 times back to back in one graph and replayed; the time per call
includes the launch gaps inside a graph, which is what a decode step pays.

    python bench/decode_kernels.py --shape llama-2-7b --batch 1 16 64 --context 200 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def graph_time_us(fn, calls: int = 20, replays: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / (calls * replays)


def variants(cfg: dict, B: int, context: int, capacity: int, dtype: torch.dtype):
    from engine.layers.rotary import RotaryEmbedding
    from kernels.decode_attention import choose_splits, decode_attention
    from kernels.fused_norm import add_rms_norm
    from kernels.rotary_kv import rotary_kv
    from kernels.silu_mul import silu_mul

    dev = torch.device("cuda")
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = hidden // H
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, hidden, device=dev, generator=g).to(dtype)
    res = torch.randn(B, hidden, device=dev, generator=g).to(dtype)
    w = torch.randn(hidden, device=dev, generator=g).to(dtype)

    def torch_norm():
        h = res.add_(x).float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)

    gate_up = torch.randn(B, 2 * inter, device=dev, generator=g).to(dtype)

    def torch_act():
        a, b = gate_up.chunk(2, dim=-1)
        return F.silu(a) * b

    rotary = RotaryEmbedding(D, 4096, 10000.0, None, dtype, dev)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, device=dev, generator=g).to(dtype)
    k_cache = torch.randn(B + 1, Hkv, capacity, D, device=dev, generator=g).to(dtype)
    v_cache = torch.randn(B + 1, Hkv, capacity, D, device=dev, generator=g).to(dtype)
    positions = torch.full((B,), context - 1, device=dev)
    slots = torch.arange(B, device=dev)
    lens = torch.full((B,), context, device=dev)

    def torch_rotary_store():
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k = rotary(positions, q.view(B, H, D), k.view(B, Hkv, D))
        k_cache[slots, :, positions] = k
        v_cache[slots, :, positions] = v.view(B, Hkv, D)
        return q

    q3 = torch.randn(B, H, D, device=dev, generator=g).to(dtype)
    out = torch.empty_like(q3)
    rows = torch.arange(B, device=dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    splits = choose_splits(B, Hkv, capacity, sms)

    def old_attention():  # the previous engine path: gather, unsplit kernel, scatter
        out[rows] = decode_attention(q3[rows], k_cache, v_cache, slots, lens, D ** -0.5)

    yield "add+rmsnorm", "torch", torch_norm
    yield "add+rmsnorm", "fused", lambda: add_rms_norm(x, res, w, 1e-5)
    for nw in (4, 8):
        yield "add+rmsnorm", f"fused num_warps={nw}", lambda nw=nw: add_rms_norm(x, res, w, 1e-5, num_warps=nw)
    yield "silu*mul", "torch", torch_act
    yield "silu*mul", "fused", lambda: silu_mul(gate_up)
    yield "rotary+kv write", "torch", torch_rotary_store
    yield "rotary+kv write", "fused", lambda: rotary_kv(qkv, H, Hkv, D, positions, rotary.cos, rotary.sin, slots,
                                                        k_cache, v_cache)
    yield "attention", "old (gather, 1 split, scatter)", old_attention
    yield "attention", "splits=1", lambda: decode_attention(q3, k_cache, v_cache, slots, lens, D ** -0.5,
                                                            splits=1, tokens=rows, out=out)
    for s in (2, 5):  # chunks of 64 combined (the first call's policy), against one program per head
        yield "attention", f"splits={s} min_chunk=64", \
            lambda s=s: decode_attention(q3, k_cache, v_cache, slots, lens, D ** -0.5, splits=s, tokens=rows,
                                         out=out, min_chunk=64)
    yield "attention", "splits=8 min_chunk=256 (one chunk used)", \
        lambda: decode_attention(q3, k_cache, v_cache, slots, lens, D ** -0.5, splits=8, tokens=rows, out=out)
    for bl in (32, 64, 128):  # the engine's decode-only launch, by block and warps (splits as chosen)
        for nw in (2, 4, 8):
            yield "rotary+kv+attention", f"fused splits={splits} block_l={bl} warps={nw}", \
                lambda bl=bl, nw=nw: decode_attention(qkv, k_cache, v_cache, slots, lens, D ** -0.5, block_l=bl,
                                                      splits=splits, tokens=rows, out=out,
                                                      rotary=(rotary.cos, rotary.sin), num_warps=nw)
    # a long context: 2048 of 4096 positions, split as the engine would for a 4096-position cache
    long_k = torch.randn(B + 1, Hkv, 4096, D, device=dev, generator=g).to(dtype)
    long_v = torch.randn(B + 1, Hkv, 4096, D, device=dev, generator=g).to(dtype)
    long_lens = torch.full((B,), 2048, device=dev)
    long_splits = choose_splits(B, Hkv, 4096, sms)
    for s in sorted({1, long_splits}):
        yield "attention ctx 2048", f"splits={s}", \
            lambda s=s: decode_attention(q3, long_k, long_v, slots, long_lens, D ** -0.5, splits=s, tokens=rows,
                                         out=out)


def main(argv=None) -> int:
    from engine.dummy import SHAPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-2-7b")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--context", type=int, default=192, help="positions attended (mean of 128 in / 128 out)")
    p.add_argument("--capacity", type=int, default=272, help="cache positions per slot (the engine's max_model_len)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    cfg = SHAPES[args.shape]
    rows = []
    for B in args.batch:
        for op, variant, fn in variants(cfg, B, args.context, args.capacity, torch.float16):
            try:
                us = graph_time_us(fn)
            except Exception as e:  # one failing variant must not hide the others
                rows.append({"batch": B, "op": op, "variant": variant, "error": f"{type(e).__name__}: {e}"[:300]})
                print(f"batch {B:3d} {op:16s} {variant:34s} FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            rows.append({"batch": B, "op": op, "variant": variant, "us_per_call": us})
            print(f"batch {B:3d} {op:16s} {variant:34s} {us:8.2f} us")
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "context": args.context, "capacity": args.capacity,
                                         "gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

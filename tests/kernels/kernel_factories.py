"""Random quantized layouts of every format, for the kernel tests and benchmarks' checks."""

from __future__ import annotations

import torch

from kernels.layouts import AWQLayout, FP8Layout, GPTQLayout, Int8Layout
from kernels.packing import AWQ_ORDER, pack_int32


def _scales(G: int, N: int, bits: int, gen: torch.Generator, dtype=torch.float16) -> torch.Tensor:
    # |w| ~ 1/sqrt(K)-ish, like real layers; positive scales
    return ((torch.rand(G, N, generator=gen) + 0.5) / 2 ** bits).to(dtype)


def gptq(K: int, N: int, bits: int, group_size: int, *, sym: bool = True, act_order: bool = False,
         group_sizes: list[int] | None = None, first_group: int = 0, gen: torch.Generator) -> GPTQLayout:
    """A GPTQ layout. act_order: g_idx is a random shuffle of k // group_size. group_sizes: explicit
    unequal groups in order (a misaligned shard), numbered from `first_group` (absolute ids)."""
    g_idx = None
    if group_sizes is not None:
        assert sum(group_sizes) == K
        ids = torch.cat([torch.full((n,), first_group + i, dtype=torch.int32) for i, n in enumerate(group_sizes)])
        G = first_group + len(group_sizes)
        g_idx = ids
    else:
        G = -(-K // group_size)
        if act_order:
            g_idx = (torch.arange(K) // group_size)[torch.randperm(K, generator=gen)].to(torch.int32)
    q = torch.randint(0, 2 ** bits, (K, N), generator=gen)
    qzeros = None
    if not sym:
        qzeros = pack_int32(torch.randint(0, 2 ** bits, (G, N), generator=gen), bits, 1)
    return GPTQLayout(qweight=pack_int32(q, bits, 0), scales=_scales(G, N, bits, gen), qzeros=qzeros, g_idx=g_idx,
                      bits=bits, group_size=group_size, in_features=K, out_features=N)


def awq(K: int, N: int, group_size: int, *, gen: torch.Generator) -> AWQLayout:
    G = -(-K // group_size)
    q = torch.randint(0, 16, (K, N), generator=gen)
    z = torch.randint(0, 16, (G, N), generator=gen)
    return AWQLayout(qweight=pack_int32(q, 4, 1, order=AWQ_ORDER), scales=_scales(G, N, 4, gen),
                     qzeros=pack_int32(z, 4, 1, order=AWQ_ORDER), group_size=group_size, in_features=K, out_features=N)


def int8(K: int, N: int, *, gen: torch.Generator) -> Int8Layout:
    w = torch.randint(-128, 128, (N, K), generator=gen).to(torch.int8)
    return Int8Layout(weight=w, scales=(torch.rand(N, generator=gen) + 0.5) / 128)


def fp8(K: int, N: int, *, per_channel: bool, gen: torch.Generator) -> FP8Layout:
    w = (torch.randn(N, K, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = (torch.rand(N, generator=gen) + 0.5) / 64 if per_channel else torch.tensor(1 / 64)
    return FP8Layout(weight=w, scales=scales)


def to_device(layout, device):
    """The same layout with every tensor on `device`."""
    fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(layout).items()}
    return type(layout)(**fields)

"""Bit packing of small unsigned integers into int32 words.

Every quantized format here stores b-bit codes as a little-endian bit stream inside int32 words
along one tensor dimension: code j of a run occupies bits [j*b, (j+1)*b) of the stream, and the
stream fills word 0 first. For b in {2, 4, 8} a word holds 32/b whole codes; for b = 3 a run of
32 codes fills 3 words and codes 10 and 21 straddle a word boundary (GPTQ's 3-bit layout).

AWQ permutes the codes inside each word (`AWQ_ORDER`): slot i of a word holds code `order[i]` of
its run. Pass `order=` to read or write that layout.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)

_MASK32 = (1 << 32) - 1


def run_shape(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest run of codes that fills whole int32 words."""
    if not 1 <= bits <= 16:
        raise ValueError(f"cannot pack {bits}-bit codes into int32 words (1..16 bits supported)")
    words = bits // math.gcd(bits, 32)
    return 32 * words // bits, words


def packed_size(count: int, bits: int) -> int:
    """Number of int32 words that hold `count` codes (the last run zero-padded)."""
    codes, words = run_shape(bits)
    return -(-count // codes) * words


def pack_int32(values: torch.Tensor, bits: int, dim: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """Pack unsigned codes in [0, 2**bits) along `dim` into int32 words.

    A length that is not a multiple of the run is zero-padded; `unpack_int32(..., count=)` trims it.
    """
    codes, words = run_shape(bits)
    if order is not None and (len(order) != codes or sorted(order) != list(range(codes))):
        raise ValueError(f"order {tuple(order)} is not a permutation of one {codes}-code run")
    v = values.movedim(dim, -1).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits: [{int(v.min())}, {int(v.max())}]")
    count = v.shape[-1]
    padded = -(-count // codes) * codes
    if padded != count:
        v = torch.nn.functional.pad(v, (0, padded - count))
    v = v.reshape(*v.shape[:-1], padded // codes, codes)
    if order is not None:
        v = v[..., list(order)]
    out = torch.zeros(*v.shape[:-1], words, dtype=torch.int64, device=v.device)
    for j in range(codes):
        bit = j * bits
        w, s = divmod(bit, 32)
        out[..., w] |= (v[..., j] << s) & _MASK32
        if s + bits > 32:
            out[..., w + 1] |= v[..., j] >> (32 - s)
    out = out.reshape(*out.shape[:-2], -1)
    out = torch.where(out >= (1 << 31), out - (1 << 32), out).to(torch.int32)
    return out.movedim(-1, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, dim: int, count: int | None = None,
                 order: Sequence[int] | None = None) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 words along `dim` → codes (int32) in [0, 2**bits)."""
    codes, words = run_shape(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed codes must be int32, got {packed.dtype}")
    p = packed.movedim(dim, -1).to(torch.int64) & _MASK32
    if p.shape[-1] % words:
        raise ValueError(f"{p.shape[-1]} words is not a whole number of {bits}-bit runs ({words} words each)")
    p = p.reshape(*p.shape[:-1], p.shape[-1] // words, words)
    mask = (1 << bits) - 1
    out = torch.empty(*p.shape[:-1], codes, dtype=torch.int64, device=p.device)
    for j in range(codes):
        bit = j * bits
        w, s = divmod(bit, 32)
        v = p[..., w] >> s
        if s + bits > 32:
            v = v | (p[..., w + 1] << (32 - s))
        out[..., j] = v & mask
    if order is not None:
        out = out[..., [list(order).index(i) for i in range(codes)]]
    out = out.reshape(*out.shape[:-2], -1)
    if count is not None:
        if count > out.shape[-1]:
            raise ValueError(f"asked for {count} codes but the words hold only {out.shape[-1]}")
        out = out[..., :count]
    return out.to(torch.int32).movedim(-1, dim).contiguous()

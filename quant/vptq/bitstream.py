"""VPTQ's packed indices: per row a stream of int32 words holding fixed-width entries, least
significant bit first, an entry crossing into the next word where it does not fit."""

from __future__ import annotations

import torch

_U32 = (1 << 32) - 1


def unpack_entries(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 [..., W] → int64 [..., count] entries of `bits` bits (1..32)."""
    if count * bits > words.shape[-1] * 32:
        raise ValueError(f"{words.shape[-1]} words hold {words.shape[-1] * 32} bits, not {count} x {bits}")
    u = words.to(torch.int64) & _U32
    u = torch.cat([u, torch.zeros_like(u[..., :1])], -1)  # entries ending in the last word read a zero past it
    pos = torch.arange(count, device=words.device) * bits
    word, shift = pos // 32, pos % 32
    lo = u[..., word] >> shift
    hi = (u[..., word + 1] << (32 - shift)) & _U32
    return (lo | hi) & ((1 << bits) - 1)


def pack_entries(entries: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 [..., count] entries of `bits` bits → int32 [..., ceil(count * bits / 32)]."""
    count = entries.shape[-1]
    planes = (entries.to(torch.int64)[..., None] >> torch.arange(bits)) & 1
    stream = planes.reshape(*entries.shape[:-1], count * bits)
    pad = -stream.shape[-1] % 32
    stream = torch.nn.functional.pad(stream, (0, pad)).reshape(*entries.shape[:-1], -1, 32)
    words = (stream << torch.arange(32)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)

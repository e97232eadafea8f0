"""Decode attention (one new query token per sequence) over a slot-based KV cache, in Triton.

Each program handles one (sequence, KV head) pair: the query heads that share that KV head are
stacked into one tile, and keys/values are read only up to the sequence's length (read from a
device tensor, so there is no host synchronisation and the kernel can be captured in a CUDA
graph). Online softmax over blocks of positions, as flash attention does.
"""

from __future__ import annotations

import os

import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_attention_kernel(
        Q, K, V, O, SLOTS, LENS, scale,
        stride_qb, stride_qh, stride_ks, stride_kh, stride_kl, stride_vs, stride_vh, stride_vl,
        stride_ob, stride_oh,
        GROUP: tl.constexpr, GROUP_TILE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr,
        DOT_F32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        slot = tl.load(SLOTS + b)
        length = tl.load(LENS + b)
        g = tl.arange(0, GROUP_TILE)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + g
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g[:, None] < GROUP, other=0.0)
        q = (q.to(tl.float32) * scale)
        m = tl.full([GROUP_TILE], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_TILE], tl.float32)
        acc = tl.zeros([GROUP_TILE, HEAD_DIM], tl.float32)
        k_base = K + slot.to(tl.int64) * stride_ks + kv_head * stride_kh
        v_base = V + slot.to(tl.int64) * stride_vs + kv_head * stride_vh
        for start in range(0, length, BLOCK_L):
            pos = start + tl.arange(0, BLOCK_L)
            valid = pos < length
            k = tl.load(k_base + pos[:, None] * stride_kl + d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_base + pos[:, None] * stride_vl + d[None, :], mask=valid[:, None], other=0.0)
            if DOT_F32:  # the interpreter's 16-bit dot is wrong; compiled code keeps the cache dtype
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:  # PRECISION: "ieee" for float32 caches (compiled float32 dots default to TF32)
                s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=PRECISION)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            if DOT_F32:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            acc = acc * alpha[:, None] + pv
            m = m_new
        out = acc / l[:, None]
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
                 mask=g[:, None] < GROUP)

    return decode_attention_kernel


_COMPILED = None


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float, block_l: int = 64) -> torch.Tensor:
    """q [B, H, D]; k/v_cache [slots, Hkv, L, D]; slots, lengths [B] (int) → [B, H, D]."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = _kernel()
    B, H, D = q.shape
    kv_heads = k_cache.shape[1]
    if H % kv_heads or D & (D - 1):
        raise ValueError(f"decode attention needs heads ({H}) a multiple of KV heads ({kv_heads}) "
                         f"and a power-of-two head size ({D})")
    group = H // kv_heads
    tile = max(16, 1 << (group - 1).bit_length())  # tl.dot wants at least 16 rows
    out = torch.empty_like(q)
    _COMPILED[(B, kv_heads)](
        q, k_cache, v_cache, out, slots, lengths, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        GROUP=group, GROUP_TILE=tile, HEAD_DIM=D, BLOCK_L=block_l, DOT_F32=_INTERPRET,
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out

"""Rotary embedding fused with the KV-cache write, in Triton: one launch per layer.

Reads the QKV projection's output [T, (H + 2 Hkv) * D], rotates every query and key head by its
token's position in place (half-split "rotate_half" form, cos/sin tables [P, D/2]), and stores
the rotated keys and the values into a slot cache [slots, Hkv, L, D] at (token slot, position).
Products and sums are rounded to the dtype one by one, as the torch path
(engine/layers/rotary.py) rounds them. Without a cache (calibration, scoring) only the rotation runs.
"""

from __future__ import annotations

import torch

_COMPILED = None


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rotary_kv_kernel(QKV, POS, SLOTS, OFFS, COS, SIN, KC, VC, stride_t, stride_p,
                         stride_ks, stride_kh, stride_kl, stride_vs, stride_vh, stride_vl,
                         HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, STORE: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)  # query heads first, then key heads (each with its value head)
        d = tl.arange(0, HALF)
        pos = tl.load(POS + t)
        cos = tl.load(COS + pos * stride_p + d)
        sin = tl.load(SIN + pos * stride_p + d)
        base = QKV + t * stride_t + head * (2 * HALF)
        x1 = tl.load(base + d)
        x2 = tl.load(base + HALF + d)
        dt = x1.dtype
        a = (x1.to(tl.float32) * cos.to(tl.float32)).to(dt).to(tl.float32)
        b = (x2.to(tl.float32) * sin.to(tl.float32)).to(dt).to(tl.float32)
        c = (x2.to(tl.float32) * cos.to(tl.float32)).to(dt).to(tl.float32)
        e = (x1.to(tl.float32) * sin.to(tl.float32)).to(dt).to(tl.float32)
        o1 = (a - b).to(dt)
        o2 = (c + e).to(dt)
        tl.store(base + d, o1)
        tl.store(base + HALF + d, o2)
        if STORE:
            if head >= HEADS:
                kv = head - HEADS
                slot = tl.load(SLOTS + t)
                at = tl.load(OFFS + t)  # the position in the slot (a paged cache: the offset in the block)
                k_dst = KC + slot * stride_ks + kv * stride_kh + at * stride_kl
                tl.store(k_dst + d, o1.to(KC.dtype.element_ty))
                tl.store(k_dst + HALF + d, o2.to(KC.dtype.element_ty))
                v_src = QKV + t * stride_t + (HEADS + KV_HEADS + kv) * (2 * HALF)
                v_dst = VC + slot * stride_vs + kv * stride_vh + at * stride_vl
                tl.store(v_dst + d, tl.load(v_src + d).to(VC.dtype.element_ty))
                tl.store(v_dst + HALF + d, tl.load(v_src + HALF + d).to(VC.dtype.element_ty))

    return rotary_kv_kernel


def rotary_kv(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, positions: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor | None = None,
              k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
              offsets: torch.Tensor | None = None) -> None:
    """Rotate q and k inside qkv [T, (heads + 2 kv_heads) * head_dim] by positions [T]; with a cache
    (k/v_cache [slots, kv_heads, L, head_dim], slots [T]) store the rotated keys and the values at
    (slot, offsets) (offsets default to the positions; a paged cache [blocks, kv_heads, block_size,
    head_dim] passes each token's block as its slot and its offset in the block)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = _kernel()
    T = qkv.shape[0]
    half = head_dim // 2
    if qkv.shape[1] != (heads + 2 * kv_heads) * head_dim or qkv.stride(-1) != 1 or half & (half - 1):
        raise ValueError(f"rotary_kv needs a row-contiguous qkv of {(heads + 2 * kv_heads) * head_dim} columns "
                         f"and a power-of-two head size, got {tuple(qkv.shape)}, head_dim {head_dim}")
    if cos.stride(-1) != 1 or cos.shape[-1] != half or cos.stride() != sin.stride():
        raise ValueError(f"rotary tables must be row-contiguous [P, {half}], got {tuple(cos.shape)}")
    if T == 0:
        return
    store = k_cache is not None
    kc = k_cache if store else qkv
    vc = v_cache if store else qkv
    ks = kc.stride() if store else (0, 0, 0)
    vs = vc.stride() if store else (0, 0, 0)
    _COMPILED[(T, heads + kv_heads)](
        qkv, positions, slots if store else positions,
        offsets if offsets is not None else positions, cos, sin, kc, vc, qkv.stride(0), cos.stride(0),
        ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
        HEADS=heads, KV_HEADS=kv_heads, HALF=half, STORE=store, num_warps=1)

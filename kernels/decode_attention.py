"""Decode attention (one new query token per sequence) over a slot-based KV cache, in Triton.

Each program handles one (sequence, KV head, split) triple: the query heads that share that KV
head are stacked into one tile, and keys/values are read only up to the sequence's length (read
from a device tensor, so there is no host synchronisation and the kernel can be captured in a
CUDA graph). Online softmax over blocks of positions, as flash attention does.

Split over the KV length (flash decoding): with `splits` > 1 each program covers one chunk of
the sequence's positions and writes its partial (max, sum, weighted values) to a workspace; the
last program of a (sequence, KV head) to finish, counted by an atomic ticket, combines them, so
the whole attention stays one launch. Few sequences then still fill the GPU.

Query rows and output rows are picked by `tokens` (the decode tokens' rows of a mixed batch), so
no gather or scatter runs around the kernel.
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
        Q, K, V, O, TOKENS, SLOTS, LENS, PART_ACC, PART_ML, TICKETS, scale,
        stride_qb, stride_qh, stride_ks, stride_kh, stride_kl, stride_vs, stride_vh, stride_vl,
        stride_ob, stride_oh,
        GROUP: tl.constexpr, GROUP_TILE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr,
        SPLITS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        num_kv = tl.num_programs(1)
        token = tl.load(TOKENS + b).to(tl.int64)
        slot = tl.load(SLOTS + b)
        length = tl.load(LENS + b)
        g = tl.arange(0, GROUP_TILE)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + g
        q = tl.load(Q + token * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g[:, None] < GROUP,
                    other=0.0)
        q = (q.to(tl.float32) * scale)
        m = tl.full([GROUP_TILE], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_TILE], tl.float32)
        acc = tl.zeros([GROUP_TILE, HEAD_DIM], tl.float32)
        k_base = K + slot.to(tl.int64) * stride_ks + kv_head * stride_kh
        v_base = V + slot.to(tl.int64) * stride_vs + kv_head * stride_vh
        chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_L) * BLOCK_L
        begin = split * chunk
        end = tl.minimum(length, begin + chunk)
        for start in range(begin, end, BLOCK_L):
            pos = start + tl.arange(0, BLOCK_L)
            valid = pos < end
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
        out_ptr = O + token * stride_ob + heads[:, None] * stride_oh + d[None, :]
        head_mask = g[:, None] < GROUP
        if SPLITS == 1:
            tl.store(out_ptr, (acc / l[:, None]).to(O.dtype.element_ty), mask=head_mask)
        else:
            # partials [B, Hkv, SPLITS, GROUP_TILE, (D | 2)]; an empty chunk leaves m = -inf, l = 0
            pair = (b * num_kv + kv_head).to(tl.int64)
            row = (pair * SPLITS + split) * GROUP_TILE + g
            tl.store(PART_ACC + row[:, None] * HEAD_DIM + d[None, :], acc)
            tl.store(PART_ML + row * 2, m)
            tl.store(PART_ML + row * 2 + 1, l)
            # every thread's partials are in before the ticket moves (acq_rel); the last sees all
            tl.debug_barrier()
            ticket = tl.atomic_add(TICKETS + pair, 1, sem="acq_rel")
            if ticket == SPLITS - 1:
                tl.debug_barrier()
                rows = pair * SPLITS * GROUP_TILE + g
                m_all = tl.full([GROUP_TILE], float("-inf"), tl.float32)
                for i in range(SPLITS):
                    m_all = tl.maximum(m_all, tl.load(PART_ML + (rows + i * GROUP_TILE) * 2, cache_modifier=".cg"))
                total = tl.zeros([GROUP_TILE], tl.float32)
                out = tl.zeros([GROUP_TILE, HEAD_DIM], tl.float32)
                for i in range(SPLITS):
                    r = rows + i * GROUP_TILE
                    m_i = tl.load(PART_ML + r * 2, cache_modifier=".cg")
                    l_i = tl.load(PART_ML + r * 2 + 1, cache_modifier=".cg")
                    w = tl.where(l_i > 0, tl.exp(m_i - m_all), 0.0)
                    total += w * l_i
                    out += w[:, None] * tl.load(PART_ACC + r[:, None] * HEAD_DIM + d[None, :], cache_modifier=".cg")
                tl.store(out_ptr, (out / total[:, None]).to(O.dtype.element_ty), mask=head_mask)
                tl.atomic_xchg(TICKETS + pair, 0)  # ready for the next launch (graph replays)

    return decode_attention_kernel


_COMPILED = None
_TICKETS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown ticket buffers a captured graph may still use


def _tickets(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (sequence, KV head); the kernel leaves them zeroed."""
    t = _TICKETS.get(device)
    if t is None or t.numel() < count:
        if t is not None:
            _RETIRED.append(t)
        t = _TICKETS[device] = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    return t


def choose_splits(batch: int, kv_heads: int, max_len: int, sms: int, block_l: int = 64) -> int:
    """Chunks of the KV length per (sequence, KV head): enough programs to fill the GPU
    (`sms` multiprocessors) without chunks shorter than one block of `block_l` positions."""
    pairs = max(1, batch * kv_heads)
    if pairs >= sms:
        return 1
    return max(1, min(-(-sms // pairs), -(-max_len // block_l), 64))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float, block_l: int = 64, splits: int = 1,
                     tokens: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D] (row stride free); k/v_cache [slots, Hkv, L, D]; slots, lengths [B] (int).
    tokens [B]: q's row of each sequence (default: rows 0..B-1, then T = B). Returns out [T, H, D]
    with those rows written (a new tensor unless `out` is given)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = _kernel()
    _, H, D = q.shape
    B = slots.shape[0]
    kv_heads = k_cache.shape[1]
    if H % kv_heads or D & (D - 1) or q.stride(-1) != 1:
        raise ValueError(f"decode attention needs heads ({H}) a multiple of KV heads ({kv_heads}), "
                         f"a power-of-two head size ({D}) and q's last dimension contiguous")
    if tokens is None:
        tokens = torch.arange(B, device=q.device)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    group = H // kv_heads
    tile = max(16, 1 << (group - 1).bit_length())  # tl.dot wants at least 16 rows
    if splits > 1:
        part_acc = torch.empty(B * kv_heads * splits * tile, D, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(B * kv_heads * splits * tile, 2, dtype=torch.float32, device=q.device)
        tickets = _tickets(q.device, B * kv_heads)
    else:
        part_acc = part_ml = tickets = out
    _COMPILED[(B, kv_heads, splits)](
        q, k_cache, v_cache, out, tokens, slots, lengths, part_acc, part_ml, tickets, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        GROUP=group, GROUP_TILE=tile, HEAD_DIM=D, BLOCK_L=block_l, SPLITS=splits, DOT_F32=_INTERPRET,
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out

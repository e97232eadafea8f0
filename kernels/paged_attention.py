"""Decode attention over a paged KV cache (block tables), in Triton.

The same kernel as kernels.decode_attention (one program per (sequence, KV head, split), the
query heads of a KV head stacked in one tile, online softmax, split-KV combined by the last
program to finish, rotary and the cache write optionally fused), except where keys and values
are: the cache is [blocks, Hkv, block_size, D] and position p of sequence b sits in block
tables[b, p // block_size] at offset p % block_size. Lengths and tables are device tensors, so
there is no host synchronisation and a CUDA graph can capture the launch (static table buffer).
"""

from __future__ import annotations

import os

import torch

from kernels.decode_attention import MIN_CHUNK

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode_kernel(
        Q, K, V, O, TOKENS, TABLES, LENS, PART_ACC, PART_ML, TICKETS, COS, SIN, scale,
        stride_qb, stride_qh, stride_tb, stride_kn, stride_kh, stride_kl, stride_vn, stride_vh, stride_vl,
        stride_ob, stride_oh, stride_cos,
        HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_TILE: tl.constexpr, HALF: tl.constexpr,
        BLOCK_L: tl.constexpr, SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr, ROTARY: tl.constexpr,
        DOT_F32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        num_kv = tl.num_programs(1)
        token = tl.load(TOKENS + b).to(tl.int64)
        table = TABLES + b.to(tl.int64) * stride_tb
        length = tl.load(LENS + b)
        g = tl.arange(0, GROUP_TILE)
        h = tl.arange(0, HALF)  # head_dim in two halves (rotary pairs element i with i + HALF)
        heads = kv_head * GROUP + g
        head_mask = g[:, None] < GROUP
        q_ptr = Q + token * stride_qb + heads[:, None] * stride_qh + h[None, :]
        q1 = tl.load(q_ptr, mask=head_mask, other=0.0)
        q2 = tl.load(q_ptr + HALF, mask=head_mask, other=0.0)
        chunk = tl.cdiv(tl.maximum(tl.cdiv(length, SPLITS), MIN_CHUNK), BLOCK_L) * BLOCK_L
        used = tl.cdiv(length, chunk)  # splits with positions; the others do nothing
        begin = split * chunk
        end = tl.minimum(length, begin + chunk)
        k_head = K + kv_head * stride_kh
        v_head = V + kv_head * stride_vh
        if ROTARY:  # Q is the QKV projection's row; this token's key and value are not in the cache yet
            new = length - 1
            cos = tl.load(COS + new * stride_cos + h).to(tl.float32)
            sin = tl.load(SIN + new * stride_cos + h).to(tl.float32)
            # the new key and value rows, loaded now so that their latency overlaps the rest
            k_row = Q + token * stride_qb + (HEADS + kv_head) * (2 * HALF)
            v_row = Q + token * stride_qb + (HEADS + num_kv + kv_head) * (2 * HALF)
            x1 = tl.load(k_row + h)
            x2 = tl.load(k_row + HALF + h)
            v1n = tl.load(v_row + h)
            v2n = tl.load(v_row + HALF + h)
            # half-split rotary, each product and sum rounded to the dtype (as the torch path rounds);
            # a nested @triton.jit helper would not resolve from this closure, hence written out twice
            dt = q1.dtype
            qa = (q1.to(tl.float32) * cos[None, :]).to(dt).to(tl.float32)
            qb = (q2.to(tl.float32) * sin[None, :]).to(dt).to(tl.float32)
            qc = (q2.to(tl.float32) * cos[None, :]).to(dt).to(tl.float32)
            qe = (q1.to(tl.float32) * sin[None, :]).to(dt).to(tl.float32)
            q1, q2 = (qa - qb).to(dt), (qc + qe).to(dt)
            cached_end = tl.minimum(end, new)
        else:
            cached_end = end
        q1 = q1.to(tl.float32) * scale
        q2 = q2.to(tl.float32) * scale
        m = tl.full([GROUP_TILE], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_TILE], tl.float32)
        acc1 = tl.zeros([GROUP_TILE, HALF], tl.float32)
        acc2 = tl.zeros([GROUP_TILE, HALF], tl.float32)
        for start in range(begin, cached_end, BLOCK_L):
            pos = start + tl.arange(0, BLOCK_L)
            valid = pos < cached_end
            # each position's block from the table, then its offset in that block
            blk = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            off = pos % BLOCK_SIZE
            k_ptr = k_head + (blk * stride_kn + off * stride_kl)[:, None] + h[None, :]
            v_ptr = v_head + (blk * stride_vn + off * stride_vl)[:, None] + h[None, :]
            k1 = tl.load(k_ptr, mask=valid[:, None], other=0.0)
            k2 = tl.load(k_ptr + HALF, mask=valid[:, None], other=0.0)
            v1 = tl.load(v_ptr, mask=valid[:, None], other=0.0)
            v2 = tl.load(v_ptr + HALF, mask=valid[:, None], other=0.0)
            if DOT_F32:  # the interpreter's 16-bit dot is wrong; compiled code keeps the cache dtype
                s = tl.dot(q1, tl.trans(k1.to(tl.float32)), input_precision="ieee")
                s = tl.dot(q2, tl.trans(k2.to(tl.float32)), s, input_precision="ieee")
            else:  # PRECISION: "ieee" for float32 caches (compiled float32 dots default to TF32)
                s = tl.dot(q1.to(k1.dtype), tl.trans(k1), input_precision=PRECISION)
                s = tl.dot(q2.to(k2.dtype), tl.trans(k2), s, input_precision=PRECISION)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            if DOT_F32:
                pv1 = tl.dot(p, v1.to(tl.float32), input_precision="ieee")
                pv2 = tl.dot(p, v2.to(tl.float32), input_precision="ieee")
            else:
                pv1 = tl.dot(p.to(v1.dtype), v1, input_precision=PRECISION)
                pv2 = tl.dot(p.to(v2.dtype), v2, input_precision=PRECISION)
            acc1 = acc1 * alpha[:, None] + pv1
            acc2 = acc2 * alpha[:, None] + pv2
            m = m_new
        if ROTARY:
            if (new >= begin) & (new < end):  # the chunk holding the new position: store it, attend to it
                ka = (x1.to(tl.float32) * cos).to(dt).to(tl.float32)
                kb = (x2.to(tl.float32) * sin).to(dt).to(tl.float32)
                kc = (x2.to(tl.float32) * cos).to(dt).to(tl.float32)
                ke = (x1.to(tl.float32) * sin).to(dt).to(tl.float32)
                k1n, k2n = (ka - kb).to(dt), (kc + ke).to(dt)
                new_blk = tl.load(table + new // BLOCK_SIZE).to(tl.int64)
                k_new = k_head + new_blk * stride_kn + (new % BLOCK_SIZE) * stride_kl
                v_new = v_head + new_blk * stride_vn + (new % BLOCK_SIZE) * stride_vl
                tl.store(k_new + h, k1n.to(K.dtype.element_ty))
                tl.store(k_new + HALF + h, k2n.to(K.dtype.element_ty))
                tl.store(v_new + h, v1n.to(V.dtype.element_ty))
                tl.store(v_new + HALF + h, v2n.to(V.dtype.element_ty))
                # as if read back from the cache: rounded to its dtype
                k1f = k1n.to(K.dtype.element_ty).to(tl.float32)
                k2f = k2n.to(K.dtype.element_ty).to(tl.float32)
                s_new = tl.sum(q1 * k1f[None, :], 1) + tl.sum(q2 * k2f[None, :], 1)
                m_new = tl.maximum(m, s_new)
                p_new = tl.exp(s_new - m_new)
                alpha = tl.exp(m - m_new)
                l = l * alpha + p_new
                acc1 = acc1 * alpha[:, None] + p_new[:, None] * v1n.to(V.dtype.element_ty).to(tl.float32)[None, :]
                acc2 = acc2 * alpha[:, None] + p_new[:, None] * v2n.to(V.dtype.element_ty).to(tl.float32)[None, :]
                m = m_new
        out_ptr = O + token * stride_ob + heads[:, None] * stride_oh + h[None, :]
        if SPLITS == 1:
            tl.store(out_ptr, (acc1 / l[:, None]).to(O.dtype.element_ty), mask=head_mask)
            tl.store(out_ptr + HALF, (acc2 / l[:, None]).to(O.dtype.element_ty), mask=head_mask)
        elif used == 1:  # the whole sequence in split 0's chunk: written directly, no partials
            if split == 0:
                tl.store(out_ptr, (acc1 / l[:, None]).to(O.dtype.element_ty), mask=head_mask)
                tl.store(out_ptr + HALF, (acc2 / l[:, None]).to(O.dtype.element_ty), mask=head_mask)
        elif split < used:
            # partials [B, Hkv, SPLITS, GROUP_TILE, (D | 2)] of the `used` splits, combined by the last
            pair = (b * num_kv + kv_head).to(tl.int64)
            row = (pair * SPLITS + split) * GROUP_TILE + g
            acc_ptr = PART_ACC + row[:, None] * (2 * HALF) + h[None, :]
            tl.store(acc_ptr, acc1)
            tl.store(acc_ptr + HALF, acc2)
            tl.store(PART_ML + row * 2, m)
            tl.store(PART_ML + row * 2 + 1, l)
            # every thread's partials are in before the ticket moves (acq_rel); the last sees all
            tl.debug_barrier()
            ticket = tl.atomic_add(TICKETS + pair, 1, sem="acq_rel")
            if ticket == used - 1:
                tl.debug_barrier()
                rows = pair * SPLITS * GROUP_TILE + g
                m_all = tl.full([GROUP_TILE], float("-inf"), tl.float32)
                for i in range(used):
                    m_all = tl.maximum(m_all, tl.load(PART_ML + (rows + i * GROUP_TILE) * 2, cache_modifier=".cg"))
                total = tl.zeros([GROUP_TILE], tl.float32)
                out1 = tl.zeros([GROUP_TILE, HALF], tl.float32)
                out2 = tl.zeros([GROUP_TILE, HALF], tl.float32)
                for i in range(used):
                    r = rows + i * GROUP_TILE
                    m_i = tl.load(PART_ML + r * 2, cache_modifier=".cg")
                    l_i = tl.load(PART_ML + r * 2 + 1, cache_modifier=".cg")
                    w = tl.exp(m_i - m_all)  # every used chunk holds positions: l_i > 0
                    total += w * l_i
                    part = PART_ACC + r[:, None] * (2 * HALF) + h[None, :]
                    out1 += w[:, None] * tl.load(part, cache_modifier=".cg")
                    out2 += w[:, None] * tl.load(part + HALF, cache_modifier=".cg")
                tl.store(out_ptr, (out1 / total[:, None]).to(O.dtype.element_ty), mask=head_mask)
                tl.store(out_ptr + HALF, (out2 / total[:, None]).to(O.dtype.element_ty), mask=head_mask)
                tl.atomic_xchg(TICKETS + pair, 0)  # ready for the next launch (graph replays)

    return paged_decode_kernel


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


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                           lengths: torch.Tensor, scale: float, block_l: int = 64, splits: int = 1,
                           tokens: torch.Tensor | None = None, out: torch.Tensor | None = None,
                           rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                           min_chunk: int = MIN_CHUNK, num_warps: int = 4) -> torch.Tensor:
    """q [T, H, D] (row stride free); k/v_cache [blocks, Hkv, block_size, D]; tables [B, W] (int,
    row-contiguous, covering each sequence's length); lengths [B]. tokens [B]: q's row of each
    sequence (default rows 0..B-1). Returns out [T, H, D] with those rows written. splits: chunks
    of the KV length per (sequence, KV head), each of at least min_chunk positions.

    rotary (cos, sin [P, D/2]): q is the QKV projection's output [T, (H + 2 Hkv) D] of decode
    tokens at position length - 1, not rotated nor cached: the kernel rotates query and key,
    stores key and value at that position's block and offset, and attends to them."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = _kernel()
    B = lengths.shape[0]
    kv_heads, block_size, D = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    if rotary is not None:
        H = q.shape[1] // D - 2 * kv_heads
        q_strides = (q.stride(0), D)
        cos, sin = rotary
        if cos.shape[-1] != D // 2 or cos.stride(-1) != 1 or cos.stride() != sin.stride():
            raise ValueError(f"rotary tables must be row-contiguous [P, {D // 2}], got {tuple(cos.shape)}")
    else:
        H = q.shape[1]
        q_strides = (q.stride(0), q.stride(1))
        cos = sin = q
    if H % kv_heads or H <= 0 or D & (D - 1) or D < 32 or q.stride(-1) != 1:
        raise ValueError(f"paged decode attention needs heads ({H}) a multiple of KV heads ({kv_heads}), "
                         f"a power-of-two head size >= 32 ({D}) and q's last dimension contiguous")
    if tables.dim() != 2 or tables.shape[0] != B or (B and tables.stride(1) != 1):
        raise ValueError(f"block tables must be row-contiguous [{B}, blocks], got {tuple(tables.shape)}")
    if tokens is None:
        tokens = torch.arange(B, device=q.device)
    if out is None:
        out = torch.empty(q.shape[0], H, D, dtype=q.dtype, device=q.device)
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
        q, k_cache, v_cache, out, tokens, tables, lengths, part_acc, part_ml, tickets, cos, sin, scale,
        q_strides[0], q_strides[1], tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), cos.stride(0),
        HEADS=H, BLOCK_SIZE=block_size, GROUP=group, GROUP_TILE=tile, HALF=D // 2, BLOCK_L=block_l, SPLITS=splits,
        MIN_CHUNK=min_chunk, ROTARY=rotary is not None, DOT_F32=_INTERPRET,
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    return out

"""Attention's side of the KV cache: the kernels that know the cache's layout.

A backend's one entry point, `attend`, takes a layer's QKV projection output for the step's new
tokens, rotates queries and keys by their positions, stores keys and values in the cache and
attends (decode tokens as one batch, prefill chunks one at a time). The model never sees the
layout.

The cache is paged (engine.kv_cache.KVCache: [blocks, Hkv, block_size, D] per layer); each
sequence's positions are found through its block table (engine.batch.ForwardBatch.bind).
`PagedAttention` runs plain torch ops: on CPU, a sequence's blocks are gathered whole and SDPA
attends with a length mask; on CUDA its decode is the paged Triton kernel (SDPA would need a
host sync, which graphs cannot capture). `TritonPagedAttention` runs a decode-only step as ONE
launch per layer: rotary, the cache write and split-KV attention fused
(kernels.paged_attention with rotary); mixed steps take rotary fused with the cache write
(kernels.rotary_kv at each token's block and offset) and then the same attention without it.
Prefill stays on torch's SDPA in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.batch import ForwardBatch
from engine.kv_cache import KVCache
from engine.layers.rotary import RotaryEmbedding
from kernels.decode_attention import choose_splits, launch_shape
from kernels.paged_attention import paged_decode_attention
from kernels.rotary_kv import rotary_kv


@dataclass(frozen=True)
class AttentionShape:
    layer: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5

    def split(self, qkv: torch.Tensor):
        """qkv [T, (H + 2 Hkv) D] → views q [T, H, D], k, v [T, Hkv, D]."""
        T, D = qkv.shape[0], self.head_dim
        q, k, v = qkv.split([self.heads * D, self.kv_heads * D, self.kv_heads * D], dim=-1)
        return q.view(T, self.heads, D), k.view(T, self.kv_heads, D), v.view(T, self.kv_heads, D)


def gather_blocks(cache_layer: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[blocks, Hkv, bs, D] gathered by tables [B, W] → [B, Hkv, W * bs, D] (positions in order).
    The (block, head) pairs are picked head-major, so the gather is the only copy (no transpose after)."""
    B, W = tables.shape
    blocks, heads, bs, D = cache_layer.shape
    rows = (tables.long() * heads).unsqueeze(1) + torch.arange(heads, device=tables.device).view(1, heads, 1)
    return cache_layer.view(blocks * heads, bs, D).index_select(0, rows.view(-1)).view(B, heads, W * bs, D)


def cache_rows(batch: ForwardBatch, heads: int) -> torch.Tensor:
    """[T * Hkv] rows of a layer's cache viewed as [blocks * Hkv * bs, D] where the new tokens' keys
    go (token-major, as k.reshape(-1, D) lists them); made once a step, shared by every layer."""
    if batch.cache_rows is None:
        head = torch.arange(heads, device=batch.token_blocks.device)
        batch.cache_rows = ((batch.token_blocks.unsqueeze(1) * heads + head) * batch.block_size
                            + batch.token_offsets.unsqueeze(1)).view(-1)
    return batch.cache_rows


def fresh_prefill_runs(batch: ForwardBatch) -> list[list[int]]:
    """The step's prefill sequences in order, grouped into runs of adjacent ones that have nothing
    cached and the same number of new tokens (attended together); every other one alone."""
    runs: list[list[int]] = []
    for i in batch.prefill_seq_index:
        prev = runs[-1][-1] if runs else None
        if (prev is not None and batch.context_lens[i] == 0 and batch.context_lens[prev] == 0
                and batch.query_lens[i] == batch.query_lens[prev]
                and batch.token_starts[i] == batch.token_starts[prev] + batch.query_lens[prev]):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


class PagedAttention:
    name = "torch"

    def attend(self, shape: AttentionShape, qkv: torch.Tensor, batch: ForwardBatch, cache: KVCache | None,
               rotary: RotaryEmbedding) -> torch.Tensor:
        """qkv [T, (H + 2 Hkv) D] of the step's new tokens → attention output [T, H, D]."""
        if cache is not None:
            batch.bind(cache)
        q, k, v = self.store(shape, qkv, batch, cache, rotary)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if batch.decode_seq_index:
            self.decode(shape, q, out, batch, cache)
        for run in fresh_prefill_runs(batch):
            if len(run) > 1:  # equal fresh prompts side by side: one causal attention over all of them
                self.prefill_together(shape, q, k, v, out, batch, run)
                continue
            i = run[0]
            start, n = batch.token_starts[i], batch.query_lens[i]
            out[start:start + n] = self.prefill(shape, q[start:start + n], k[start:start + n], v[start:start + n],
                                                cache, batch, i)
        return out

    @staticmethod
    def prefill_together(shape: AttentionShape, q, k, v, out, batch: ForwardBatch, run: list[int]) -> None:
        """Sequences `run`, adjacent in the step, each with n new tokens and nothing cached: their
        tokens viewed as [G, n, heads, D] attend causally in one call (no cache read: all is in q, k, v)."""
        n, start = batch.query_lens[run[0]], batch.token_starts[run[0]]
        rows = slice(start, start + len(run) * n)

        def heads_first(t):
            return t[rows].view(len(run), n, t.shape[1], t.shape[2]).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=True,
                                           scale=shape.scale, enable_gqa=shape.heads != shape.kv_heads)
        out[rows] = o.transpose(1, 2).reshape(len(run) * n, shape.heads, shape.head_dim)

    def store(self, shape: AttentionShape, qkv, batch: ForwardBatch, cache: KVCache | None, rotary):
        """(q, k, v) with q and k rotated; with a cache, k and v written at each token's (block, offset)."""
        q, k, v = shape.split(qkv)
        q, k = rotary(batch.positions, q, k)
        if cache is not None:  # index_copy_ on flat rows: far cheaper than a [blocks, :, offsets] index_put
            rows, D = cache_rows(batch, shape.kv_heads), shape.head_dim
            cache.k[shape.layer].view(-1, D).index_copy_(0, rows, k.reshape(-1, D))
            cache.v[shape.layer].view(-1, D).index_copy_(0, rows, v.reshape(-1, D))
        return q, k, v

    def decode(self, shape: AttentionShape, q: torch.Tensor, out: torch.Tensor, batch: ForwardBatch,
               cache: KVCache) -> None:
        """Fill out's rows of the decode tokens: q [T, H, D] attends to each sequence's blocks."""
        k_cache, v_cache = cache.k[shape.layer], cache.v[shape.layer]
        if q.is_cuda:
            paged_decode_attention(q, k_cache, v_cache, batch.decode_tables, batch.decode_kv_lens, shape.scale,
                                   tokens=batch.decode_token_index, out=out)
            return
        for bucket in batch.decode_buckets():  # similar lengths together: padding stays under 2x
            keys, values = gather_blocks(k_cache, bucket.tables), gather_blocks(v_cache, bucket.tables)
            whole = bucket.everyone and batch.all_decode  # every token, in order: no row picking
            o = F.scaled_dot_product_attention((q if whole else q[bucket.token_rows]).unsqueeze(2), keys, values,
                                               attn_mask=bucket.mask, scale=shape.scale,
                                               enable_gqa=shape.heads != shape.kv_heads).squeeze(2)
            if whole:
                out.copy_(o)
            else:
                out[bucket.token_rows] = o

    def prefill(self, shape: AttentionShape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: KVCache | None, batch: ForwardBatch, i: int) -> torch.Tensor:
        """Causal attention of sequence i's n new tokens (q [n, H, D], k/v [n, Hkv, D]) after its
        context_lens[i] cached positions → [n, H, D]."""
        n, context = q.shape[0], batch.context_lens[i]
        gqa = shape.heads != shape.kv_heads
        q = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if context == 0:
            keys, values = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=shape.scale, enable_gqa=gqa)
        else:
            table = batch.tables[i: i + 1, :-(-(context + n) // batch.block_size)]
            keys = gather_blocks(cache.k[shape.layer], table)[:, :, :context + n]
            values = gather_blocks(cache.v[shape.layer], table)[:, :, :context + n]
            mask = torch.ones(n, context + n, dtype=torch.bool, device=q.device).tril(diagonal=context)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=shape.scale, enable_gqa=gqa)
        return o.squeeze(0).transpose(0, 1)


class TritonPagedAttention(PagedAttention):
    name = "triton"

    def __init__(self):
        self._sms: dict[torch.device, int] = {}

    def attend(self, shape, qkv, batch, cache, rotary):
        if cache is None or not batch.all_decode:
            return super().attend(shape, qkv, batch, cache, rotary)
        batch.bind(cache)
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        out = torch.empty(qkv.shape[0], shape.heads, shape.head_dim, dtype=qkv.dtype, device=qkv.device)
        self._attention(shape, qkv, out, batch, cache, rotary=(rotary.cos, rotary.sin))
        return out

    def store(self, shape, qkv, batch, cache, rotary):
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        stored = cache is not None
        rotary_kv(qkv, shape.heads, shape.kv_heads, shape.head_dim, batch.positions, rotary.cos, rotary.sin,
                  batch.token_blocks if stored else None, cache.k[shape.layer] if stored else None,
                  cache.v[shape.layer] if stored else None, offsets=batch.token_offsets if stored else None)
        return shape.split(qkv)

    def decode(self, shape, q, out, batch, cache):
        self._attention(shape, q, out, batch, cache)

    def _attention(self, shape, q, out, batch, cache, rotary=None) -> None:
        # no host sync: lengths and tables stay on the device; the split count follows the
        # table's width (a sequence shorter than one chunk costs no more for it)
        k_cache = cache.k[shape.layer]
        tables = batch.decode_tables
        sequences, sms = tables.shape[0], self._multiprocessors(k_cache.device)
        block_l, warps = launch_shape(sequences, shape.kv_heads, sms)
        paged_decode_attention(q, k_cache, cache.v[shape.layer], tables, batch.decode_kv_lens, shape.scale,
                               block_l=block_l, num_warps=warps,
                               splits=choose_splits(sequences, shape.kv_heads, tables.shape[1] * cache.block_size,
                                                    sms),
                               tokens=batch.decode_token_index, out=out, rotary=rotary)

    def _multiprocessors(self, device: torch.device) -> int:
        if device not in self._sms:
            self._sms[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                                 if device.type == "cuda" else 4)  # interpreter: a few, to exercise splits
        return self._sms[device]


def paged_attention_backend(fused: bool) -> PagedAttention:
    """The backend of the paged cache: Triton kernels when `fused`, else torch."""
    return TritonPagedAttention() if fused else PagedAttention()


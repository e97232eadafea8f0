"""Causal self-attention over the KV cache (plain torch SDPA; grouped-query heads native)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.batch import ForwardBatch
from engine.kv_cache import KVCache
from kernels.decode_attention import decode_attention


class CachedAttention(nn.Module):
    def __init__(self, layer_index: int, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.layer = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
                cache: KVCache | None) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] for the step's new tokens → [T, H*D]. Without a cache
        (calibration, scoring) every sequence must be a whole prompt."""
        if cache is None:
            if batch.decode_seq_index or any(batch.context_lens):
                raise ValueError("attention without a KV cache runs whole prompts only")
            k_cache = v_cache = None
        else:
            k_cache, v_cache = cache.k[self.layer], cache.v[self.layer]  # [slots, Hkv, L, D]
            k_cache[batch.token_slots, :, batch.positions] = k
            v_cache[batch.token_slots, :, batch.positions] = v
        out = torch.empty_like(q)
        if batch.decode_seq_index:
            idx = batch.decode_token_index
            out[idx] = self._decode(q[idx], k_cache, v_cache, batch)
        for i in batch.prefill_seq_index:
            start, n, ctx = batch.token_starts[i], batch.query_lens[i], batch.context_lens[i]
            out[start:start + n] = self._prefill(q[start:start + n], k[start:start + n], v[start:start + n],
                                                 k_cache, v_cache, batch.slots[i], ctx)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _decode(self, q, k_cache, v_cache, batch: ForwardBatch) -> torch.Tensor:
        if q.is_cuda:  # reads each sequence only up to its length, with no host sync (CUDA graphs)
            return decode_attention(q, k_cache, v_cache, batch.decode_slots, batch.decode_kv_lens, self.scale)
        length = int(batch.decode_kv_lens.max())
        if batch.decode_slot_range is not None:
            first, count = batch.decode_slot_range
            keys, values = k_cache[first:first + count, :, :length], v_cache[first:first + count, :, :length]
        else:
            keys = k_cache.index_select(0, batch.decode_slots)[:, :, :length]
            values = v_cache.index_select(0, batch.decode_slots)[:, :, :length]
        o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=batch.decode_mask,
                                           scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
        return o.squeeze(2)

    def _prefill(self, q, k, v, k_cache, v_cache, slot: int, context: int) -> torch.Tensor:
        n = q.shape[0]
        gqa = self.num_heads != self.num_kv_heads
        q = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if context == 0:
            keys, values = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            keys = k_cache[slot: slot + 1, :, : context + n]
            values = v_cache[slot: slot + 1, :, : context + n]
            mask = torch.ones(n, context + n, dtype=torch.bool, device=q.device).tril(diagonal=context)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        return o.squeeze(0).transpose(0, 1)

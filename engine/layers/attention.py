"""Causal self-attention over the KV cache, with rotary positions applied as keys are stored.

All cache-layout-specific work (rotary + store, decode, prefill) is the attention backend's
(engine/layers/attention_backend.py).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.batch import ForwardBatch
from engine.kv_cache import KVCache
from engine.layers.attention_backend import AttentionShape, PagedAttention
from engine.layers.rotary import RotaryEmbedding


class CachedAttention(nn.Module):
    def __init__(self, layer_index: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rotary: RotaryEmbedding, backend: PagedAttention):
        super().__init__()
        self.shape = AttentionShape(layer_index, num_heads, num_kv_heads, head_dim)
        self.rotary = rotary
        self.backend = backend

    def forward(self, qkv: torch.Tensor, batch: ForwardBatch, cache: KVCache | None) -> torch.Tensor:
        """qkv [T, (H + 2 Hkv) D] of the step's new tokens → [T, H*D]. Without a cache
        (calibration, scoring) every sequence must be a whole prompt."""
        if cache is None and (batch.decode_seq_index or any(batch.context_lens)):
            raise ValueError("attention without a KV cache runs whole prompts only")
        out = self.backend.attend(self.shape, qkv, batch, cache, self.rotary)
        return out.view(qkv.shape[0], self.shape.heads * self.shape.head_dim)

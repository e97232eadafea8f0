"""The Llama family (Llama 2/3, Mistral, Qwen2): pre-norm decoder blocks of grouped-query
attention with rotary positions and a SwiGLU MLP.

Tensor parallelism lives in the parallel layers; this file reads like the architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.batch import ForwardBatch
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.layers.attention import CachedAttention
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from parallel.embedding import ParallelLMHead, VocabParallelEmbedding
from parallel.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from parallel.state import ParallelContext
from quant.base import WeightsLoader


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, prefix: str, weights, loader: WeightsLoader,
                 ctx: ParallelContext, rotary: RotaryEmbedding):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"], cfg.hidden_size,
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, weights, loader, ctx, bias=cfg.qkv_bias)
        self.o_proj = RowParallelLinear(f"{prefix}.o_proj", cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size,
                                        weights, loader, ctx, bias=cfg.o_bias, unit=cfg.head_dim)
        self.heads, self.kv_heads = self.qkv_proj.num_local_heads, self.qkv_proj.num_local_kv_heads
        self.head_dim = cfg.head_dim
        self.rotary = rotary
        self.attn = CachedAttention(i, self.heads, self.kv_heads, cfg.head_dim)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.local_sizes, dim=-1)
        q = q.view(-1, self.heads, self.head_dim)
        k = k.view(-1, self.kv_heads, self.head_dim)
        v = v.view(-1, self.kv_heads, self.head_dim)
        q, k = self.rotary(batch.positions, q, k)
        return self.o_proj(self.attn(q, k, v, batch, cache))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, weights, loader: WeightsLoader, ctx: ParallelContext):
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear([f"{prefix}.gate_proj", f"{prefix}.up_proj"], [size, size],
                                                       cfg.hidden_size, weights, loader, ctx, bias=cfg.mlp_bias)
        self.down_proj = RowParallelLinear(f"{prefix}.down_proj", size, cfg.hidden_size, weights, loader, ctx,
                                           bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, weights, loader: WeightsLoader, ctx: ParallelContext,
                 rotary: RotaryEmbedding):
        super().__init__()
        prefix = f"model.layers.{i}"
        self.input_layernorm = RMSNorm(weights.get_tensor(f"{prefix}.input_layernorm.weight", shape=[cfg.hidden_size]), cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, i, f"{prefix}.self_attn", weights, loader, ctx, rotary)
        self.post_attention_layernorm = RMSNorm(weights.get_tensor(f"{prefix}.post_attention_layernorm.weight", shape=[cfg.hidden_size]),
                                                cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg, f"{prefix}.mlp", weights, loader, ctx)

    def forward(self, h: torch.Tensor, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), batch, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, weights, loader: WeightsLoader, ctx: ParallelContext,
                 dtype: torch.dtype, device: torch.device, progress=None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = VocabParallelEmbedding("model.embed_tokens", cfg.vocab_size, cfg.hidden_size, weights, ctx)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
                                 dtype, device)
        layers = []
        for i in range(cfg.num_hidden_layers):
            layers.append(LlamaDecoderLayer(cfg, i, weights, loader, ctx, rotary))
            if progress is not None:
                progress.update(1)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(weights.get_tensor("model.norm.weight", shape=[cfg.hidden_size]), cfg.rms_norm_eps)
        tied = cfg.tie_word_embeddings
        self.lm_head = ParallelLMHead("lm_head", cfg.vocab_size, cfg.hidden_size, weights, ctx,
                                      tied_to=self.embed_tokens if tied else None, loader=loader)
        self.num_local_kv_heads = self.layers[0].self_attn.kv_heads

    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Final hidden states of the tokens in batch.logits_index (each sequence's last, by default)."""
        h = self.embed_tokens(batch.token_ids)
        for layer in self.layers:
            h = layer(h, batch, cache)
        return self.norm(h[batch.logits_index])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

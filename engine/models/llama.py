"""The Llama family (Llama 2/3, Mistral, Qwen2): pre-norm decoder blocks of grouped-query
attention with rotary positions and a SwiGLU MLP.

Tensor parallelism lives in the parallel layers, the KV cache's layout in the attention backend,
fused kernels in the layers (engine option `kernels`); this file reads like the architecture.
The residual stream is carried beside each block's output and added inside the next norm.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.batch import ForwardBatch
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.layers.activation import SiluAndMul
from engine.layers.attention import CachedAttention
from engine.layers.attention_backend import PagedAttention, paged_attention_backend
from engine.layers.kernel_choice import use_triton
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from parallel.embedding import ParallelLMHead, VocabParallelEmbedding
from parallel.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from parallel.state import ParallelContext
from quant.base import WeightsLoader


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, prefix: str, weights, loader: WeightsLoader,
                 ctx: ParallelContext, rotary: RotaryEmbedding, backend: PagedAttention):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"], cfg.hidden_size,
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, weights, loader, ctx, bias=cfg.qkv_bias)
        self.o_proj = RowParallelLinear(f"{prefix}.o_proj", cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size,
                                        weights, loader, ctx, bias=cfg.o_bias, unit=cfg.head_dim)
        self.heads, self.kv_heads = self.qkv_proj.num_local_heads, self.qkv_proj.num_local_kv_heads
        self.attn = CachedAttention(i, self.heads, self.kv_heads, cfg.head_dim, rotary, backend)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        return self.o_proj(self.attn(self.qkv_proj(x), batch, cache))  # rotary as keys enter the cache


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, weights, loader: WeightsLoader, ctx: ParallelContext,
                 fused: bool):
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear([f"{prefix}.gate_proj", f"{prefix}.up_proj"], [size, size],
                                                       cfg.hidden_size, weights, loader, ctx, bias=cfg.mlp_bias)
        self.down_proj = RowParallelLinear(f"{prefix}.down_proj", size, cfg.hidden_size, weights, loader, ctx,
                                           bias=cfg.mlp_bias)
        self.act = SiluAndMul(fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, weights, loader: WeightsLoader, ctx: ParallelContext,
                 rotary: RotaryEmbedding, backend: PagedAttention, fused: bool):
        super().__init__()
        prefix = f"model.layers.{i}"
        self.input_layernorm = RMSNorm(weights.get_tensor(f"{prefix}.input_layernorm.weight", shape=[cfg.hidden_size]),
                                       cfg.rms_norm_eps, fused)
        self.self_attn = LlamaAttention(cfg, i, f"{prefix}.self_attn", weights, loader, ctx, rotary, backend)
        self.post_attention_layernorm = RMSNorm(weights.get_tensor(f"{prefix}.post_attention_layernorm.weight", shape=[cfg.hidden_size]),
                                                cfg.rms_norm_eps, fused)
        self.mlp = LlamaMLP(cfg, f"{prefix}.mlp", weights, loader, ctx, fused)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch,
                cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(this block's output, the residual stream before it is added); the block's input is
        residual + h (h alone for the first block, residual None)."""
        x, residual = self.input_layernorm(h, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, batch, cache), residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, weights, loader: WeightsLoader, ctx: ParallelContext,
                 dtype: torch.dtype, device: torch.device, progress=None, kernels: str = "auto"):
        super().__init__()
        self.config = cfg
        fused = use_triton(kernels, device)
        attention = paged_attention_backend(fused)
        self.embed_tokens = VocabParallelEmbedding("model.embed_tokens", cfg.vocab_size, cfg.hidden_size, weights, ctx)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
                                 dtype, device)
        layers = []
        for i in range(cfg.num_hidden_layers):
            layers.append(LlamaDecoderLayer(cfg, i, weights, loader, ctx, rotary, attention, fused))
            if progress is not None:
                progress.update(1)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(weights.get_tensor("model.norm.weight", shape=[cfg.hidden_size]), cfg.rms_norm_eps, fused)
        tied = cfg.tie_word_embeddings
        self.lm_head = ParallelLMHead("lm_head", cfg.vocab_size, cfg.hidden_size, weights, ctx,
                                      tied_to=self.embed_tokens if tied else None, loader=loader)
        self.num_local_kv_heads = self.layers[0].self_attn.kv_heads

    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Final hidden states of the tokens in batch.logits_index (each sequence's last, by default;
        every token when None, as in a decode step)."""
        h, residual = self.embed_tokens(batch.token_ids), None
        for layer in self.layers:
            h, residual = layer(h, residual, batch, cache)
        h, _ = self.norm(h, residual)
        return h if batch.logits_index is None else h[batch.logits_index]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

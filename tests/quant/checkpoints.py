"""Synthetic quantized checkpoints for loader tests, reusable by every format's tests.

- `random_result`: a QuantResult of random codes / zeros / scales (scales exact in float16, so a
  checkpoint storing them in fp16 dequantizes bit for bit like `QuantResult.dequantize()`),
  optionally with an act-order g_idx (a random permutation of groups).
- `gptq_tensors` / `awq_tensors`: a layer's tensors in each format, written here from the format
  facts (not through the library's packers, which tests compare against these).
- `save_checkpoint`: model.safetensors (+ config.json) in a directory; `CountingWeights`: Weights
  that also records the bytes read per tensor.
- `expected_slice`: the rank's part of a full [N, K] weight, from the shard's definition alone.
- `write_tiny_llama` / `export_with_reference` / `greedy_tokens`: a small float Llama checkpoint,
  its quantized export, a float checkpoint of exactly the dequantized weights, and greedy tokens
  through `engine.LLM`, for end-to-end comparisons.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.weights import Weights
from kernels.packing import AWQ_ORDER, pack_int32
from parallel.sharding import LinearShard
from quant.calibrate.args import QuantResult


@contextmanager
def one_intra_op_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a busy machine (no spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def random_result(out_features: int, in_features: int, bits: int, group_size: int, sym: bool,
                  act_order: bool = False, min_zero: int = 0, seed: int = 0) -> QuantResult:
    """Random codes/zeros/scales. group_size -1 = one group; min_zero 1 keeps zeros GPTQ-v1 safe."""
    gen = torch.Generator().manual_seed(seed)
    g = in_features if group_size == -1 else group_size
    groups = in_features // g
    top = (1 << bits) - 1
    codes = torch.randint(0, top + 1, (out_features, in_features), generator=gen, dtype=torch.int32)
    if sym:
        zeros = torch.full((out_features, groups), 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(min_zero, top + 1, (out_features, groups), generator=gen, dtype=torch.int32)
    scales = (torch.rand(out_features, groups, generator=gen) * 0.02 + 1e-3).half().float()
    g_idx = torch.arange(in_features, dtype=torch.int32) // g
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)].contiguous()
    return QuantResult(codes, scales, zeros, g_idx, g, bits, sym, 0.0)


def gptq_tensors(prefix: str, result: QuantResult, version: str = "gptq_v2", dtype=torch.float16,
                 with_g_idx: bool = True) -> dict[str, torch.Tensor]:
    """GPTQ tensors: qweight [K/pack, N] along K, qzeros [G, N/pack] (v1: z - 1), scales [G, N]."""
    zeros = result.zeros.T.contiguous()
    if version == "gptq":
        if bool((zeros < 1).any()):
            raise ValueError("a zero point of 0 has no GPTQ v1 encoding")
        zeros = zeros - 1
    tensors = {f"{prefix}.qweight": pack_int32(result.codes.T, result.bits, 0),
               f"{prefix}.qzeros": pack_int32(zeros, result.bits, 1),
               f"{prefix}.scales": result.scales.T.to(dtype).contiguous()}
    if with_g_idx:
        tensors[f"{prefix}.g_idx"] = result.g_idx.clone()
    return tensors


def awq_tensors(prefix: str, result: QuantResult, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """AWQ GEMM tensors: qweight [K, N/8] and qzeros [G, N/8] along N in AWQ order, scales [G, N]."""
    return {f"{prefix}.qweight": pack_int32(result.codes.T, 4, 1, AWQ_ORDER),
            f"{prefix}.qzeros": pack_int32(result.zeros.T, 4, 1, AWQ_ORDER),
            f"{prefix}.scales": result.scales.T.to(dtype).contiguous()}


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], quantization_config: dict | None = None,
                    config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    if config is not None or quantization_config is not None:
        cfg = dict(config or {})
        if quantization_config is not None:
            cfg["quantization_config"] = quantization_config
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


class CountingWeights(Weights):
    """Weights that also counts the bytes read per tensor name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_by_name: dict[str, int] = {}

    def read(self, name, index=None, **kwargs):
        before = self.bytes_read
        t = super().read(name, index, **kwargs)
        self.read_by_name[name] = self.read_by_name.get(name, 0) + self.bytes_read - before
        return t

    def reset(self) -> None:
        self.bytes_read = 0
        self.read_by_name = {}


def expected_slice(full: dict[str, torch.Tensor], shard: LinearShard) -> torch.Tensor:
    """The rank's [N_local, K_local] part: each block's rows of its source, the shard's K range."""
    return torch.cat([full[b.source][b.offset + b.start: b.offset + b.stop, shard.k_start: shard.k_stop]
                      for b in shard.blocks], dim=0)


# -- a small Llama, quantized end to end ------------------------------------------------------


def write_tiny_llama(path: Path, hidden: int = 256, heads: int = 8, kv_heads: int = 2, intermediate: int = 1152,
                     layers: int = 2, vocab: int = 512, attention_bias: bool = True, seed: int = 0,
                     std: float = 0.08) -> Path:
    """config.json + model.safetensors of a random float32 Llama (untied head, q/k/v/o biases)."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * std

    t = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": 1 + rand(hidden),
         "lm_head.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
                  "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
                  "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
                  "mlp.down_proj": (hidden, intermediate)}
        for name, shape in shapes.items():
            t[f"{p}.{name}.weight"] = rand(*shape)
            if attention_bias and name.startswith("self_attn"):
                t[f"{p}.{name}.bias"] = rand(shape[0])
        t[f"{p}.input_layernorm.weight"] = 1 + rand(hidden)
        t[f"{p}.post_attention_layernorm.weight"] = 1 + rand(hidden)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False,
              "attention_bias": attention_bias, "hidden_act": "silu", "torch_dtype": "float32",
              "bos_token_id": 1, "eos_token_id": 2}
    return save_checkpoint(path, t, config=config)


def export_with_reference(float_dir: Path, out_dir: Path, ref_dir: Path, packer,
                          quantize: Callable[[str, torch.Tensor], QuantResult],
                          dtype: torch.dtype = torch.float16) -> tuple[Path, Path]:
    """Quantize `float_dir` through `export_quantized` into `out_dir`, and write `ref_dir`: a float32
    checkpoint with the quantized checkpoint's other tensors and, for every quantized layer,
    `QuantResult.dequantize()` with scales rounded as the checkpoint stores them."""
    from quant.export import export_quantized

    results: dict[str, QuantResult] = {}

    def recording(prefix: str, weight: torch.Tensor) -> QuantResult:
        results[prefix] = quantize(prefix, weight)
        return results[prefix]

    export_quantized(float_dir, out_dir, packer, recording, dtype=dtype, progress=False)
    tensors = {}
    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            prefix, suffix = name.rsplit(".", 1)
            if prefix not in results or suffix == "bias":
                tensors[name] = f.get_tensor(name).float()
    for prefix, r in results.items():
        stored = replace(r, scales=r.scales.to(dtype).float())
        tensors[f"{prefix}.weight"] = stored.dequantize()
    config = json.loads((out_dir / "config.json").read_text())
    config.pop("quantization_config")
    config["torch_dtype"] = config["dtype"] = "float32"
    save_checkpoint(ref_dir, tensors, config=config)
    return out_dir, ref_dir


PROMPTS = [[5, 17, 99, 3, 42], [7, 8], [200, 100, 50, 25, 12, 6, 3, 1, 9, 300, 411]]


def greedy_tokens(path: Path, tp: int = 1, prompts=PROMPTS, new_tokens: int = 8) -> list[list[int]]:
    """Greedy float32 continuations through engine.LLM (TP > 1: spawned ranks)."""
    from engine import LLM, SamplingParams

    with LLM(path, tensor_parallel_size=tp, executor="uni" if tp == 1 else "mp", dtype="float32",
             progress=False) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    return [o.token_ids for o in outs]

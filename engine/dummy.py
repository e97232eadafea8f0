"""Random weights of a named shape, made in place: the `load_format="dummy"` tensor source.

`DummyWeights` implements the TensorSource protocol that `Weights` implements over safetensors,
but synthesizes each tensor (or just the box a rank asks for) on the rank's device, so that a
70B-shaped model needs no checkpoint on disk and no rank ever builds more than its shard.
Values are a counter-based hash of (tensor name, seed, element index): every rank sees the same
full tensor whatever its slice, so TP=1 and TP=N run the same model.

Quantized shapes get valid tensors of their format, described by that format's own Packer
(`random_tensors`, found through quant.registry): e.g. uniformly random codes, constant zero points
and small scales (effective weight std ≈ 0.02, as HF's initializer), so activations stay in range
through dozens of layers. This module knows no packing rule.

`write_config(shape, quant, dir)` writes the config.json a dummy model is built from.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch

from engine.config import ConfigError, ModelConfig
from quant.base import QuantConfigError
from quant.common.random_weights import RandomTensor
from quant.registry import packer_class

_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
          "attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-5}

# Named shapes (public architecture hyper-parameters).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(_LLAMA, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, rope_theta=10000.0,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32"),
    "smollm2-135m": dict(_LLAMA, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16"),
    "llama-2-7b": dict(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, torch_dtype="float16"),
    "llama-2-13b": dict(_LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                        max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2, torch_dtype="float16"),
    "llama-2-70b": dict(_LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                        max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2, torch_dtype="float16"),
    "llama-3-8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                       bos_token_id=128000, eos_token_id=[128001, 128009], torch_dtype="bfloat16"),
}

QUANTS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "gptq-w4g128": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                    "checkpoint_format": "gptq"},
    "awq-w4g128": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "bnb-nf4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False, "bnb_4bit_quant_storage": "uint8"},
    "bnb-int8": {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True, "llm_int8_threshold": 6.0},
    "hqq-w4g64": {"quant_method": "hqq", "skip_modules": ["lm_head"],
                  "quant_config": {"weight_quant_params": {"nbits": 4, "channel_wise": True, "group_size": 64,
                                                           "axis": 1, "view_as_float": False}}},
    "quanto-int4": {"quant_method": "quanto", "weights": "int4", "activations": None,
                    "modules_to_not_convert": ["lm_head"]},
    "quanto-int8": {"quant_method": "quanto", "weights": "int8", "activations": None,
                    "modules_to_not_convert": ["lm_head"]},
    "torchao-int4-g128": {"quant_method": "torchao", "modules_to_not_convert": None, "quant_type": {"default": {
        "_type": "Int4WeightOnlyConfig", "_version": 2, "_data": {"group_size": 128, "int4_packing_format": "plain"}}}},
    "torchao-int8": {"quant_method": "torchao", "modules_to_not_convert": None, "quant_type": {"default": {
        "_type": "Int8WeightOnlyConfig", "_version": 2,
        "_data": {"granularity": {"_type": "PerRow", "_version": 1, "_data": {"dim": -1}}}}}},
}

WEIGHT_STD = 0.02  # HF's initializer_range for Llama
_MASK32 = (1 << 32) - 1
_CHUNK = 1 << 22  # elements hashed at a time: bounds the int64 temporaries


def write_config(shape: str, quant: str, out_dir: str | Path) -> Path:
    """Write config.json for a named shape (and quantization) into out_dir; returns out_dir."""
    if shape not in SHAPES:
        raise ConfigError(f"unknown model shape {shape!r}; known: {', '.join(SHAPES)}")
    if quant not in QUANTS:
        raise ConfigError(f"unknown dummy quantization {quant!r}; known: {', '.join(QUANTS)}")
    cfg = dict(SHAPES[shape])
    if QUANTS[quant] is not None:
        group = QUANTS[quant].get("group_size") or 1  # formats nesting theirs check it in random_tensors
        for field in ("hidden_size", "intermediate_size"):
            if cfg[field] % group:
                raise ConfigError(f"{quant} needs {field} divisible by group_size {group}; shape {shape} has "
                                  f"{field}={cfg[field]}")
        cfg["quantization_config"] = dict(QUANTS[quant])
    cfg["qshard_dummy"] = {"shape": shape, "quant": quant}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def parameter_count(cfg: ModelConfig) -> int:
    """Logical weights of the model (codes count as one each), for memory estimates."""
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    q = cfg.num_attention_heads * cfg.head_dim
    layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    return cfg.num_hidden_layers * layer + cfg.vocab_size * h + head + h


class DummyWeights:
    """TensorSource of random weights for `cfg` (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 seed: int = 0):
        self.dtype = dtype
        self.device = torch.device(device)
        self.seed = seed
        self.bytes_read = 0  # nothing comes from disk
        self.bytes_made = 0
        self._specs: dict[str, RandomTensor] = {}
        self._build(cfg)

    # -- what exists -----------------------------------------------------------------------------

    def _build(self, cfg: ModelConfig) -> None:
        h, hd = cfg.hidden_size, cfg.head_dim
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        half = WEIGHT_STD * 3 ** 0.5  # uniform in [-half, half] has std WEIGHT_STD
        self._add("model.embed_tokens.weight", (cfg.vocab_size, h), "uniform", half)
        if not cfg.tie_word_embeddings:
            self._add("lm_head.weight", (cfg.vocab_size, h), "uniform", half)
        self._add("model.norm.weight", (h,), "ones")
        linear = self._linear_maker(cfg.quantization_config)
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            self._add(f"{p}.input_layernorm.weight", (h,), "ones")
            self._add(f"{p}.post_attention_layernorm.weight", (h,), "ones")
            for name, n, k, bias in (("self_attn.q_proj", q, h, cfg.qkv_bias), ("self_attn.k_proj", kv, h, cfg.qkv_bias),
                                     ("self_attn.v_proj", kv, h, cfg.qkv_bias), ("self_attn.o_proj", h, q, cfg.o_bias),
                                     ("mlp.gate_proj", cfg.intermediate_size, h, cfg.mlp_bias),
                                     ("mlp.up_proj", cfg.intermediate_size, h, cfg.mlp_bias),
                                     ("mlp.down_proj", h, cfg.intermediate_size, cfg.mlp_bias)):
                linear(f"{p}.{name}", n, k)
                if bias:
                    self._add(f"{p}.{name}.bias", (n,), "uniform", half)

    def _add(self, name: str, shape: tuple[int, ...], kind: str, value: float | int = 0.0,
             dtype: torch.dtype | None = None) -> None:
        self._specs[name] = RandomTensor(tuple(shape), kind, value, dtype)

    def _linear_maker(self, quant: dict[str, Any] | None):
        half = WEIGHT_STD * 3 ** 0.5
        if not quant:
            return lambda prefix, n, k: self._add(f"{prefix}.weight", (n, k), "uniform", half)
        method = str(quant.get("quant_method", "")).lower()
        try:
            packer = packer_class(method).for_config(quant)
        except QuantConfigError as e:
            raise ConfigError(f"no dummy weights for quant_method={method!r}: {e}") from None

        def quantized(prefix: str, n: int, k: int) -> None:
            try:
                self._specs.update(packer.random_tensors(prefix, n, k, WEIGHT_STD))
            except QuantConfigError as e:
                raise ConfigError(f"no dummy weights for quant_method={method!r}: {e}") from None

        return quantized

    # -- the TensorSource protocol ---------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._specs)

    def has(self, name: str) -> bool:
        return name in self._specs

    def _spec(self, name: str) -> RandomTensor:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"tensor {name} does not exist in this dummy model") from None

    def get_shape(self, name: str) -> list[int]:
        return list(self._spec(name).shape)

    def get_dtype(self, name: str) -> torch.dtype:
        return self._spec(name).dtype or self.dtype

    def get_tensor(self, name: str, shape=None) -> torch.Tensor:
        if shape is not None and self.get_shape(name) != list(shape):
            raise ValueError(f"tensor {name} has shape {self.get_shape(name)}, expected {list(shape)}")
        return self.read(name)

    def read(self, name: str, index: tuple[slice, ...] | None = None, raw: bool = False) -> torch.Tensor:
        """The box `index` of tensor `name`, made on self.device (floats in self.dtype; raw: in the
        tensor's own dtype, as Weights.read(raw=True) gives the stored one)."""
        spec = self._spec(name)
        box = []
        for s, size in zip(_expand(index, len(spec.shape), name), spec.shape):
            start, stop, step = s.indices(size)
            if step != 1:
                raise ValueError(f"dummy tensor {name}: strided reads are not supported ({s})")
            box.append((start, max(start, stop)))
        own = spec.dtype or self.dtype
        out_dtype = own if raw or not own.is_floating_point else self.dtype
        out = self._make(name, spec, box, out_dtype)
        self.bytes_made += out.numel() * out.element_size()
        return out

    # -- making values ---------------------------------------------------------------------------

    def _make(self, name: str, spec: RandomTensor, box: list[tuple[int, int]], dtype: torch.dtype) -> torch.Tensor:
        shape = [b - a for a, b in box]
        dev = self.device
        if spec.kind == "ones":
            return torch.ones(shape, dtype=dtype, device=dev)
        if spec.kind == "const":
            return torch.full(shape, int(spec.value), dtype=dtype, device=dev)
        if spec.kind == "group_ids":
            (a, b), = box
            return (torch.arange(a, b, device=dev) // int(spec.value)).to(dtype)
        if spec.kind == "values":
            whole = torch.tensor(spec.value, dtype=spec.dtype or dtype).reshape(spec.shape)
            return whole[tuple(slice(a, b) for a, b in box)].to(dtype=dtype, device=dev)
        out = torch.empty(shape, dtype=dtype, device=dev)
        if out.numel() == 0:
            return out
        seed = (zlib.crc32(name.encode()) ^ (self.seed * 0x9E3779B1)) & _MASK32
        rows = shape[0]
        per_row = out[0].numel() if out.dim() > 1 else 1
        step = max(1, _CHUNK // max(per_row, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            sub = [(box[0][0] + r0, box[0][0] + r1)] + box[1:]
            x = _hash_box(seed, spec.shape, sub, dev)
            if spec.kind == "codes":  # every bit random: uniform codes in every field
                out[r0:r1] = (x - ((x >> 31) << 32)).to(torch.int32)
                continue
            u = x.to(torch.float32) * (1.0 / 2 ** 32)
            if spec.kind == "uniform":
                out[r0:r1] = ((u * 2 - 1) * float(spec.value)).to(dtype)
            elif spec.kind == "scales":
                out[r0:r1] = ((0.75 + 0.5 * u) * float(spec.value)).to(dtype)
            else:
                raise AssertionError(spec.kind)
        return out


def _expand(index, ndim: int, name: str) -> list[slice]:
    """One slice per dim from a read index of slices and at most one Ellipsis (as safetensors takes)."""
    index = tuple(index or ())
    if any(i is not Ellipsis and not isinstance(i, slice) for i in index):
        raise ValueError(f"dummy tensor {name}: read with slices only, got {index}")
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1:]
    if len(index) > ndim:
        raise ValueError(f"dummy tensor {name}: {len(index)} indices for {ndim} dims")
    return list(index) + [slice(None)] * (ndim - len(index))


def _hash_box(seed: int, shape: tuple[int, ...], box: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """A 32-bit hash (int64 values in [0, 2^32)) of each element's flat index in the full tensor."""
    idx = torch.zeros((), dtype=torch.int64, device=device)
    stride = 1
    nd = len(shape)
    for d in reversed(range(nd)):
        a, b = box[d]
        r = torch.arange(a, b, dtype=torch.int64, device=device) * stride
        idx = idx + r.view([-1] + [1] * (nd - 1 - d))
        stride *= shape[d]
    x = (idx * 0x9E3779B1 + seed) & _MASK32
    for _ in range(2):  # a 32-bit integer finaliser: good enough avalanche for weights
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)

"""Model configuration read from an HF checkpoint's config.json (Llama, Mistral, Qwen2)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kernels.errors import InputError, QShardError

logger = logging.getLogger(__name__)


class ConfigError(QShardError, ValueError):
    """config.json is missing, malformed or describes something qshard does not run."""


# model_type -> (attention bias on q/k/v, bias on o_proj): Llama and Mistral read `attention_bias`
# for all four; Qwen2 always has q/k/v bias and never an o_proj bias.
_FAMILIES = {"llama": None, "mistral": None, "qwen2": (True, False)}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16,
           "float": torch.float32}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    hidden_act: str
    torch_dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    quantization_config: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_path = path / "config.json"
        if not path.is_dir():
            raise ConfigError(f"model directory {path} " + ("is a file, not a directory" if path.exists() else "does not exist"))
        if not cfg_path.exists():
            raise ConfigError(f"{path} has no config.json: not an HF model directory")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{cfg_path} cannot be read: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{cfg_path} holds a JSON {type(raw).__name__}, not an object of model fields")
        if raw.get("quantization_config") is not None and not isinstance(raw["quantization_config"], dict):
            raise ConfigError(f"{cfg_path}: quantization_config must be an object, got {raw['quantization_config']!r}")
        quant = raw.get("quantization_config")
        qc_file = path / "quantize_config.json"  # older AutoGPTQ checkpoints keep it apart
        if quant is None and qc_file.exists():
            try:
                quant = json.loads(qc_file.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{qc_file} is not valid JSON: {e}") from None
            quant.setdefault("quant_method", "gptq")
        qmap_file = path / "quanto_qmap.json"  # optimum-quanto's save_pretrained keeps its layer map apart
        if qmap_file.exists() and (quant is None or quant.get("quant_method") == "quanto"):
            quant = {**(quant or {"quant_method": "quanto"}), "qmap_file": str(qmap_file)}  # quant.quanto reads it
        gen_eos = _generation_eos(path)
        return cls.from_dict(raw, quant, gen_eos, where=str(cfg_path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], quant: dict[str, Any] | None = None,
                  extra_eos: tuple[int, ...] = (), where: str = "config.json") -> "ModelConfig":
        def need(key: str, kind=int):
            if key not in raw or raw[key] is None:
                raise ConfigError(f"{where}: required field {key!r} is missing")
            value = raw[key]
            if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{where}: field {key!r} must be a positive integer, got {value!r}")
            return value

        model_type = raw.get("model_type")
        if model_type not in _FAMILIES:
            raise ConfigError(f"{where}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(_FAMILIES)})")
        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        head_dim = raw.get("head_dim") or hidden // heads
        if raw.get("head_dim") is None and hidden % heads:
            raise ConfigError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        if heads % kv_heads:
            raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported (only silu)")
        family_bias = _FAMILIES[model_type]
        if family_bias is None:
            qkv_bias = o_bias = bool(raw.get("attention_bias", False))
        else:
            qkv_bias, o_bias = family_bias
        # transformers 5 writes rope_parameters; older checkpoints rope_theta + rope_scaling.
        rope_params = raw.get("rope_parameters") or {}
        rope_theta = float(rope_params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_scaling = raw.get("rope_scaling")
        if rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind == "default":
                rope_scaling = None
            elif kind not in ("llama3", "linear"):
                raise ConfigError(f"{where}: rope scaling type {kind!r} is not supported (llama3, linear)")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
        eos_ids = tuple(dict.fromkeys(eos_ids + tuple(extra_eos)))
        dtype_name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        if dtype_name not in _DTYPES:
            raise ConfigError(f"{where}: dtype {dtype_name!r} is not supported")
        return cls(
            model_type=model_type, hidden_size=hidden, intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"), num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, vocab_size=need("vocab_size"), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta, rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), qkv_bias=qkv_bias, o_bias=o_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)), hidden_act=act, torch_dtype=_DTYPES[dtype_name],
            eos_token_ids=eos_ids, bos_token_id=raw.get("bos_token_id"),
            quantization_config=quant if quant else None, raw=raw,
        )


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):  # an argument, not config.json: InputError
        raise InputError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16, auto") from None


def _generation_eos(path: Path) -> tuple[int, ...]:
    gen = path / "generation_config.json"
    if not gen.exists():
        return ()
    try:
        eos = json.loads(gen.read_text()).get("eos_token_id")
    except json.JSONDecodeError:
        logger.warning("ignoring malformed %s", gen)
        return ()
    return tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])

"""The default model in a checkpoint some package wrote (hqq, torchao), end to end, for
tests/quant/test_hqq.py and test_torchao.py: qshard at TP=1 and TP=3 (spawned gloo ranks), and
transformers on the exact dequantized twin (its float model with every quantized weight replaced
by the checkpoint's weight decoded in float32 from the stored codes, scales and zeros), with the
tolerances of tests/quant/test_default_model_formats.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def float_tensors(default_model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(default_model_dir / "model.safetensors"), framework="pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and any(f".{p}." in name + "." for p in LINEARS) and ".layers." in name


def write_checkpoint(default_model_dir: Path, out: Path, tensors: dict[str, torch.Tensor], quantization_config: dict,
                     metadata: dict | None = None) -> Path:
    """config.json (+ quantization_config), the tokenizer files, and model.safetensors = `tensors`."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata=metadata)
    config = json.loads((default_model_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(default_model_dir, out)
    return out


def copy_tokenizer(default_model_dir: Path, out: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        if (default_model_dir / name).exists() and not (out / name).exists():
            (out / name).write_bytes((default_model_dir / name).read_bytes())


def run(default_model_dir: Path, path: Path, twin) -> dict:
    """twin: the float32 weights by name, or a function making them (called after qshard's runs)."""
    from transformers import AutoModelForCausalLM

    from tests.quant.test_default_model_formats import _generate, _hf_run

    tokens1, logprobs1, logits1 = _generate(path, 1)
    tokens3, logprobs3, _ = _generate(path, 3)
    if callable(twin):
        twin = twin()
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    float_logits, _, _ = _hf_run(model, tokens1)
    _, unexpected = model.load_state_dict(twin, strict=False)
    assert not unexpected and len(twin) == 210
    hf_logits, hf_logprobs, hf_argmax = _hf_run(model, tokens1)
    return dict(tokens1=tokens1, tokens3=tokens3, logprobs1=logprobs1, logprobs3=logprobs3, logits1=logits1,
                hf_logits=hf_logits, hf_logprobs=hf_logprobs, hf_argmax=hf_argmax, float_logits=float_logits)


def check(name: str, r: dict) -> None:
    assert r["tokens3"] == r["tokens1"] and all(len(t) == 8 for t in r["tokens1"])
    tp_diff = (r["logprobs3"] - r["logprobs1"]).abs().max().item()
    logit_diff = (r["logits1"] - r["hf_logits"]).abs().max().item()
    logprob_diff = (r["logprobs1"] - r["hf_logprobs"]).abs().max().item()
    shift = (r["logits1"] - r["float_logits"]).abs().max().item()
    print(f"{name}: TP=3 vs TP=1 max |logprob diff| {tp_diff:.2e}; vs transformers (dequantized twin) max |logit "
          f"diff| {logit_diff:.2e}, max |logprob diff| {logprob_diff:.2e}; quantization moved logits by {shift:.2f}; "
          f"tokens {r['tokens1']}")
    assert tp_diff < 1e-3
    assert logit_diff < 1e-3 and logprob_diff < 1e-3
    assert shift > 1000 * logit_diff  # both sides really run the quantized weights
    assert r["hf_argmax"] == r["tokens1"]

"""A second model shape for the calibration sweep: the default model widened and rotated, the same
function (issue 20's "converted checkpoint" where no second real model installs here).

From a Llama checkpoint (default: the prepared SmolLM2-135M, hidden 576, 9 heads, 3 KV heads) it
writes one with hidden = new_heads x head_dim (default 12 x 64 = 768) whose logits equal the
original's up to float32 rounding:

- Heads: old query head g*r + j (r = heads per KV head) becomes new head g*r' + j; the added
  query heads (j >= r) have zero q_proj rows and zero o_proj input columns, so they contribute
  nothing. KV heads and head_dim are unchanged.
- Residual stream: every RMSNorm weight is folded into the linears that read it (q/k/v, gate/up,
  the final norm into an untied lm_head), the stream is padded with zero dims to the new hidden
  size and rotated by one random orthogonal Q (fixed seed): embed' = pad(E) Q, readers
  W' = pad(W) Q, writers (o_proj, down_proj) W' = Q^T pad(W).
- Norms: Q keeps |x|, so over the padded stream mean(x'^2) = |x|^2 / new = mean(x^2) * old/new.
  With weight c and eps' in every norm, c / sqrt(|x|^2/new + eps') = 1 / sqrt(|x|^2/old + eps)
  for every x needs c^2 = old/new and eps' = eps * old/new: weight sqrt(old/new) (0.866 for
  576 -> 768, not its inverse) and rms_norm_eps scaled by old/new. Exact, eps included.

The weights' distribution differs from the original's (folded norm scales, rotation spreads
outliers over every column, zero heads), which is what makes it a second shape for a quantizer.

    .venv/bin/python bench/wide_twin.py --out /tmp/wide-twin/SmolLM2-135M-wide768 [--check]

`--check` compares the twin's logits with the original's in HF transformers (float32).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

logger = logging.getLogger("wide_twin")

# files besides the weights and config that make the directory a loadable model
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                "special_tokens_map.json", "tokenizer.model")


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal [n, n] float64 (QR of a Gaussian, signs fixed by R's diagonal)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def head_rows(old_heads: int, new_heads: int, kv_heads: int) -> list[int]:
    """New head index of each old query head, keeping every head in its KV group."""
    old_r, new_r = old_heads // kv_heads, new_heads // kv_heads
    return [(h // old_r) * new_r + h % old_r for h in range(old_heads)]


def check_shape(config: dict, new_heads: int) -> None:
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    if new_heads % kv or new_heads // kv < heads // kv:
        raise SystemExit(f"new_heads={new_heads}: must be a multiple of num_key_value_heads={kv} with at least "
                         f"{heads // kv} query heads per KV head (num_attention_heads={heads})")
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if new_heads * head_dim < config["hidden_size"]:
        raise SystemExit(f"new_heads={new_heads} x head_dim={head_dim} is narrower than hidden_size="
                         f"{config['hidden_size']}: the twin only widens")


def widen(state: dict[str, torch.Tensor], config: dict, new_heads: int, seed: int = 0
          ) -> tuple[dict[str, torch.Tensor], dict]:
    """The widened, rotated state dict (float32) and config of a Llama checkpoint (see module doc)."""
    check_shape(config, new_heads)
    old_h, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or old_h // heads
    new_h = new_heads * head_dim
    q = random_orthogonal(new_h, seed)
    w = {k: v.to(torch.float64) for k, v in state.items()}
    if "lm_head.weight" not in w:  # tied: the head is the embedding, untied below
        w["lm_head.weight"] = w["model.embed_tokens.weight"]

    def pad_cols(m: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(m, (0, new_h - old_h))

    def reader(m: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:  # reads the residual stream
        return pad_cols(m * norm.unsqueeze(0)) @ q

    def writer(m: torch.Tensor) -> torch.Tensor:  # writes the residual stream
        return q.T @ torch.nn.functional.pad(m, (0, 0, 0, new_h - old_h))

    new_rows = head_rows(heads, new_heads, kv)
    out: dict[str, torch.Tensor] = {}
    norm_c = torch.full((new_h,), math.sqrt(old_h / new_h), dtype=torch.float64)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        ln1, ln2 = w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"]
        wq = w[p + "self_attn.q_proj.weight"].reshape(heads, head_dim, old_h)
        q_rows = torch.zeros(new_heads, head_dim, old_h, dtype=torch.float64)
        q_rows[new_rows] = wq
        out[p + "self_attn.q_proj.weight"] = reader(q_rows.reshape(new_h, old_h), ln1)
        for name in ("k_proj", "v_proj"):
            out[p + f"self_attn.{name}.weight"] = reader(w[p + f"self_attn.{name}.weight"], ln1)
        wo = w[p + "self_attn.o_proj.weight"].reshape(old_h, heads, head_dim)
        o_cols = torch.zeros(old_h, new_heads, head_dim, dtype=torch.float64)
        o_cols[:, new_rows] = wo
        out[p + "self_attn.o_proj.weight"] = writer(o_cols.reshape(old_h, new_h))
        for name in ("gate_proj", "up_proj"):
            out[p + f"mlp.{name}.weight"] = reader(w[p + f"mlp.{name}.weight"], ln2)
        out[p + "mlp.down_proj.weight"] = writer(w[p + "mlp.down_proj.weight"])
        out[p + "input_layernorm.weight"] = norm_c
        out[p + "post_attention_layernorm.weight"] = norm_c
    out["model.embed_tokens.weight"] = pad_cols(w["model.embed_tokens.weight"]) @ q
    out["lm_head.weight"] = reader(w["lm_head.weight"], w["model.norm.weight"])
    out["model.norm.weight"] = norm_c
    leftover = set(w) - set(out) - {"lm_head.weight"}
    if leftover:  # biases or other tensors this conversion does not know how to carry
        raise SystemExit(f"wide_twin: tensors not converted: {', '.join(sorted(leftover)[:5])}")
    new_config = dict(config, hidden_size=new_h, num_attention_heads=new_heads, head_dim=head_dim,
                      rms_norm_eps=config["rms_norm_eps"] * old_h / new_h, tie_word_embeddings=False,
                      dtype="float32", _model_name_or_path=f"wide twin of {config.get('_model_name_or_path', '?')}")
    new_config.pop("torch_dtype", None)
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}, new_config


def write_twin(source: Path, out: Path, new_heads: int, seed: int) -> None:
    from safetensors.torch import load_file, save_file

    config = json.loads((source / "config.json").read_text())
    state, new_config = widen(load_file(source / "model.safetensors"), config, new_heads, seed)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
    for name in COPIED_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    logger.info("wrote %s: hidden %d -> %d, heads %d -> %d (rotation seed %d)", out, config["hidden_size"],
                new_config["hidden_size"], config["num_attention_heads"], new_heads, seed)


def logits_of(model_dir: Path, token_ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0]


def check(source: Path, twin: Path, prompt: str) -> dict:
    """HF transformers' float32 logits of both models on one prompt: the largest difference."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(source)(prompt)["input_ids"]
    a, b = logits_of(source, ids), logits_of(twin, ids)
    return {"tokens": len(ids), "max_abs_diff": (a - b).abs().max().item(), "max_abs_logit": a.abs().max().item(),
            "same_argmax": bool((a.argmax(-1) == b.argmax(-1)).all())}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="float HF Llama directory (default: the default model)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--heads", type=int, default=12, help="query heads of the twin (hidden = heads x head_dim)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rotation")
    p.add_argument("--check", action="store_true", help="compare logits with the original in HF transformers")
    p.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog. def fibonacci(n): return n")
    args = p.parse_args()
    if args.model is None:
        from engine.default_model import prepare_default

        args.model = prepare_default()
    write_twin(args.model, args.out, args.heads, args.seed)
    if args.check:
        print(json.dumps(check(args.model, args.out, args.prompt)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The default model in a codebook format (AQLM, VPTQ), end to end, for tests/quant/test_aqlm.py and
test_vptq.py: quantized by the format's simple k-means quantizer and written by its Packer
(`export_quantized`), run by qshard at TP=1 and TP=3 (spawned gloo ranks), and compared with
transformers running the exact dequantized twin (transformers' float model of the checkpoint's
tensors, every quantized weight replaced by the quantizer's own decode of the stored codebooks:
the aqlm / vptq packages need a GPU to run the checkpoint itself)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

# "The capital of France is", "def fibonacci(n):" in SmolLM2's tokenizer (as test_default_model_formats)
PROMPTS = [[504, 3575, 282, 4649, 314], [1604, 3987, 46477, 24, 94, 727]]
NEW_TOKENS = 8


@dataclass
class Run:
    tokens_tp1: list[list[int]]
    tokens_tp3: list[list[int]]
    logprobs_tp1: torch.Tensor
    logprobs_tp3: torch.Tensor
    logits_tp1: torch.Tensor
    hf_logits: torch.Tensor
    hf_logprobs: torch.Tensor
    hf_argmax: list[list[int]]
    float_logits: torch.Tensor
    config: dict
    layers: int


def _generate(path: Path, tp: int):
    from engine import LLM, SamplingParams
    from engine.batch import ForwardBatch

    with LLM(path, tensor_parallel_size=tp, executor="uni" if tp == 1 else "mp", dtype="float32",
             progress=False) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True,
                                                    logprobs=0))
        logits = None
        if tp == 1:
            worker = llm.executor.worker
            batch = ForwardBatch.build(PROMPTS, [0] * len(PROMPTS), list(range(len(PROMPTS))), worker.ctx.device)
            with torch.inference_mode():
                worker.cache.reserve(len(PROMPTS), max(len(p) for p in PROMPTS))
                logits = worker.model.compute_logits(worker.model(batch, worker.cache)).float().cpu()
    tokens = [o.token_ids for o in outs]
    logprobs = torch.tensor([[lp[t] for t, lp in zip(o.token_ids, o.logprobs)] for o in outs])
    return tokens, logprobs, logits


def _hf_run(model, tokens):
    logits, logprobs, argmax = [], [], []
    with torch.no_grad():
        for prompt, generated in zip(PROMPTS, tokens):
            out = model(torch.tensor([prompt + generated])).logits[0].float()
            steps = out[len(prompt) - 1: len(prompt) - 1 + len(generated)]
            logits.append(out[len(prompt) - 1])
            logprobs.append(steps.log_softmax(-1).gather(1, torch.tensor(generated)[:, None])[:, 0])
            argmax.append(steps.argmax(-1).tolist())
    return torch.stack(logits), torch.stack(logprobs), argmax


def run_format(default_model_dir: Path, out_dir: Path, packer, quantize: Callable[[str, torch.Tensor], object]) -> Run:
    """`quantize(prefix, weight)` returns the format's codes object, whose `.dequantize(torch.float16)`
    is the weight the checkpoint encodes."""
    import json

    from transformers import AutoModelForCausalLM

    from quant.export import export_quantized

    results = {}

    def recording(prefix, w):
        results[prefix] = quantize(prefix, w)
        return results[prefix]

    path = export_quantized(default_model_dir, out_dir, packer, recording, progress=False)
    tokens1, logprobs1, logits1 = _generate(path, 1)
    tokens3, logprobs3, _ = _generate(path, 3)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        float_logits = torch.stack([model(torch.tensor([p])).logits[0, -1].float() for p in PROMPTS])
    state = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            quantized = any(name.startswith(p + ".") for p in results) and not name.endswith(".bias")
            if not quantized:
                state[name] = f.get_tensor(name).float()
    for prefix, r in results.items():
        state[f"{prefix}.weight"] = r.dequantize(torch.float16)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf_logits, hf_logprobs, hf_argmax = _hf_run(model, tokens1)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    return Run(tokens1, tokens3, logprobs1, logprobs3, logits1, hf_logits, hf_logprobs, hf_argmax, float_logits,
               config, len(results))


def check_run(fmt: str, r: Run) -> None:
    """The assertions and tolerances of tests/quant/test_default_model_formats.py (figures printed first)."""
    tp_diff = (r.logprobs_tp3 - r.logprobs_tp1).abs().max().item()
    logit_diff = (r.logits_tp1 - r.hf_logits).abs().max().item()
    logprob_diff = (r.logprobs_tp1 - r.hf_logprobs).abs().max().item()
    quant_shift = (r.logits_tp1 - r.float_logits).abs().max().item()
    print(f"{fmt}: TP=3 vs TP=1 max |logprob diff| {tp_diff:.2e}; vs transformers (dequantized twin) max |logit diff| "
          f"{logit_diff:.2e}, max |logprob diff| {logprob_diff:.2e}; quantization moved logits by up to "
          f"{quant_shift:.2f}; tokens TP=1 {r.tokens_tp1}, TP=3 {r.tokens_tp3}")
    assert r.tokens_tp3 == r.tokens_tp1
    assert all(len(t) == NEW_TOKENS for t in r.tokens_tp1)
    assert tp_diff < 1e-3
    assert logit_diff < 1e-3 and logprob_diff < 1e-3
    assert quant_shift > 1000 * logit_diff  # both sides really run the quantized weights
    assert r.hf_argmax == r.tokens_tp1

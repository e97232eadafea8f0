"""Test helpers shared across test packages (import as `from tests.helpers import ...`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_hf_llama(path: Path, *, model_type: str = "llama", hidden: int = 128, heads: int = 8, kv_heads: int = 2,
                   intermediate: int = 256, layers: int = 2, vocab: int = 256, tied: bool = False,
                   attention_bias: bool = False, seed: int = 0, init_std: float = 0.08, dtype=torch.float32) -> Path:
    """A random-weight checkpoint saved by transformers itself (config.json + model.safetensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  intermediate_size=intermediate, num_hidden_layers=layers, vocab_size=vocab,
                  tie_word_embeddings=tied, max_position_embeddings=512, initializer_range=init_std,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if model_type == "llama":
        kwargs["attention_bias"] = attention_bias
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # HF zero-initialises biases; random ones test that they are loaded
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, init_std)
    model.save_pretrained(path)
    return path


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int, dtype=torch.float32):
    """transformers' greedy continuation and last-position logits of each token-id prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokens, logits = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            logits.append(model(ids).logits[0, -1].float())
            out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            tokens.append(out[0, len(p):].tolist())
    return tokens, torch.stack(logits)


def engine_last_logits(path: Path, prompts: list[list[int]], dtype=torch.float32, device="cpu") -> torch.Tensor:
    """qshard's last-position logits for each prompt, from one TP=1 worker, all prompts in one batch."""
    from engine.engine_config import EngineConfig
    from engine.step import StepInput
    from engine.worker import Worker
    from parallel.state import single_process

    worker = Worker(EngineConfig(str(path), dtype=dtype, progress=False), single_process(device))
    from engine.batch import ForwardBatch

    batch = ForwardBatch.build(prompts, [0] * len(prompts), list(range(len(prompts))), torch.device(device))
    with torch.inference_mode():
        worker.cache.reserve(len(prompts), max(len(p) for p in prompts))
        return worker.model.compute_logits(worker.model(batch, worker.cache)).float()


def read_json(path: Path):
    return json.loads(Path(path).read_text())

"""Random-weight Llama/Qwen2 checkpoints written by transformers: qshard's tokens equal
transformers' at TP 1, 2 and 4 (4 > KV heads: KV heads replicated)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.helpers import engine_last_logits, hf_greedy, write_hf_llama

PROMPTS = [[5, 17, 99, 3, 42], [7, 8], [200, 100, 50, 25, 12, 6, 3, 1, 9], [31] * 12]
NEW_TOKENS = 12

CASES = {
    "llama-untied": dict(model_type="llama", tied=False, attention_bias=False),
    "llama-bias": dict(model_type="llama", tied=False, attention_bias=True),
    "qwen2-qkv-bias": dict(model_type="qwen2", tied=True),
}


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    path = write_hf_llama(tmp_path_factory.mktemp(request.param), **CASES[request.param])
    tokens, logits = hf_greedy(path, PROMPTS, NEW_TOKENS)
    return path, tokens, logits


def _generate(path, tp):
    executor = "uni" if tp == 1 else "mp"
    with LLM(path, tensor_parallel_size=tp, executor=executor, dtype="float32", progress=False) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    return [o.token_ids for o in outs]


def test_logits_match_transformers(checkpoint):
    path, _, hf_logits = checkpoint
    assert (engine_last_logits(path, PROMPTS) - hf_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tokens_equal_transformers(checkpoint, tp):
    path, hf_tokens, _ = checkpoint
    assert _generate(path, tp) == hf_tokens

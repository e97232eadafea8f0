"""The default model (SmolLM2-135M) against HF transformers, and across tensor-parallel sizes."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.helpers import engine_last_logits, hf_greedy

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
           "The three primary colors are", "Water boils at", "In 1492, Columbus"]
NEW_TOKENS = 32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompt_ids(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    return [tok(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_reference(default_model_dir, prompt_ids):
    return hf_greedy(default_model_dir, prompt_ids, NEW_TOKENS)


@pytest.fixture(scope="module")
def tp1_tokens(default_model_dir):
    with LLM(default_model_dir, dtype="float32", progress=False) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    return [o.token_ids for o in outs]


def test_greedy_tokens_equal_transformers(tp1_tokens, hf_reference):
    hf_tokens, _ = hf_reference
    assert len(tp1_tokens) == len(PROMPTS) >= 5
    for ours, theirs in zip(tp1_tokens, hf_tokens):
        assert len(ours) == NEW_TOKENS
        assert ours == theirs


def test_last_position_logits_match_transformers(default_model_dir, prompt_ids, hf_reference):
    _, hf_logits = hf_reference
    ours = engine_last_logits(default_model_dir, prompt_ids)
    diff = (ours - hf_logits).abs().max().item()
    assert diff < 1e-3, diff


def test_tensor_parallel_3_equals_tp1(default_model_dir, tp1_tokens):
    with LLM(default_model_dir, tensor_parallel_size=3, executor="mp", dtype="float32", progress=False) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
        assert llm.executor_name == "mp"
    assert [o.token_ids for o in outs] == tp1_tokens


def test_chat_template_and_text(default_model_dir):
    with LLM(default_model_dir, progress=False) as llm:
        out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(max_tokens=16, temperature=0))[0]
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")

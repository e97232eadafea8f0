"""Decode through captured CUDA graphs gives the tokens eager decode gives (GPU only)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.dummy import SHAPES
from launch.cmd_write_random import write_random

pytestmark = pytest.mark.cuda


# 5 sequences: the graph of bucket 8 runs with 3 padding rows. 4 for the 30-layer model: a padded
# bucket multiplies 8 rows where eager multiplies 5, the Triton kernel may then pick another split
# of K, and 30 random fp16 layers turn that rounding into a different greedy token.
@pytest.mark.parametrize("shape, quant, count", [("tiny", "none", 5), ("tiny", "gptq-w4g128", 5),
                                                 ("smollm2-135m", "none", 4)])
def test_graph_decode_equals_eager(tmp_path, shape, quant, count):
    write_random(shape, quant, tmp_path, dtype="float16", progress=False)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, SHAPES[shape]["vocab_size"], (count, 24), generator=gen).tolist()
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    tokens = {}
    for graphs in (False, True):
        with LLM(str(tmp_path), device="cuda", dtype="float16", executor="uni", max_num_seqs=8, max_model_len=64,
                 cuda_graphs=graphs, progress=False) as llm:
            tokens[graphs] = [list(o.token_ids) for o in llm.generate(prompts, params)]
    assert tokens[True] == tokens[False]

"""The fused decode-layer path (engine option kernels="triton": add+RMSNorm, SiLU-and-mul,
rotary+KV write, split-KV decode attention) gives the torch path's tokens and logits: on CPU
under the Triton interpreter (tiny model), on CUDA compiled with CUDA graphs (float32 cache)."""

from __future__ import annotations

import os

import pytest
import torch

from engine import LLM, SamplingParams
from engine.batch import ForwardBatch
from engine.engine_config import EngineConfig
from engine.worker import Worker
from kernels.errors import InputError
from parallel.state import single_process
from tests.helpers import write_hf_llama

PROMPTS = [[5, 17, 99, 3, 42], [7, 8], [200, 100, 50, 25, 12, 6, 3, 1, 9]]

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU runs Triton interpreted")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # head_dim 32, 3 query heads per KV head: GQA with a padded group tile
    return write_hf_llama(tmp_path_factory.mktemp("fused"), hidden=192, heads=6, kv_heads=2, intermediate=160,
                          layers=2, vocab=256)


def _worker(path, kernels, device="cpu"):
    return Worker(EngineConfig(str(path), dtype=torch.float32, device=device, progress=False, kernels=kernels,
                               cuda_graphs=False), single_process(torch.device(device)))


def _decode_logits(worker, steps=4):
    """Prefill all prompts together, then `steps` greedy decode steps of all three at once."""
    device = worker.ctx.device
    seqs = [list(p) for p in PROMPTS]
    slots = list(range(len(seqs)))
    worker.cache.reserve(len(seqs), 64)
    out = []
    with torch.inference_mode():
        batch = ForwardBatch.build(seqs, [0] * len(seqs), slots, device)
        logits = worker.model.compute_logits(worker.model(batch, worker.cache))
        for _ in range(steps):
            out.append(logits.float().cpu())
            nxt = logits.argmax(-1).tolist()
            context = [len(s) for s in seqs]
            for s, t in zip(seqs, nxt):
                s.append(t)
            batch = ForwardBatch.build([[t] for t in nxt], context, slots, device)
            logits = worker.model.compute_logits(worker.model(batch, worker.cache))
    return torch.stack(out), seqs


@interpreted
def test_fused_equals_torch_on_cpu(checkpoint):
    ref_logits, ref_tokens = _decode_logits(_worker(checkpoint, "torch"))
    fused = _worker(checkpoint, "triton")
    assert fused.model.layers[0].self_attn.attn.backend.name == "triton"
    got_logits, got_tokens = _decode_logits(fused)
    assert got_tokens == ref_tokens
    assert (got_logits - ref_logits).abs().max().item() < 1e-4


def test_auto_is_torch_on_cpu_and_bad_value_refused(checkpoint):
    worker = _worker(checkpoint, "auto")
    assert worker.model.layers[0].self_attn.attn.backend.name == "torch"
    assert not worker.model.layers[0].input_layernorm.fused
    with pytest.raises(InputError, match="kernels must be one of auto, torch, triton, got 'fast'"):
        _worker(checkpoint, "fast")
    with pytest.raises(InputError, match="got 'fast'"):  # refused by the driver, before any rank starts
        LLM(str(checkpoint), kernels="fast", progress=False)


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [False, True])
def test_fused_equals_torch_on_cuda(checkpoint, graphs):
    """Greedy tokens of the fused path equal the torch path's (float32 weights and cache)."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    tokens = {}
    for kernels in ("torch", "triton"):
        with LLM(str(checkpoint), device="cuda", dtype="float32", executor="uni", max_num_seqs=4, max_model_len=64,
                 cuda_graphs=graphs, kernels=kernels, progress=False) as llm:
            tokens[kernels] = [list(o.token_ids) for o in llm.generate(PROMPTS, params)]
    assert tokens["triton"] == tokens["torch"]


@pytest.mark.cuda
def test_fused_equals_transformers_on_cuda(checkpoint):
    """The fused path on CUDA (kernels auto, graphs) gives transformers' greedy tokens (float32)."""
    from tests.helpers import hf_greedy

    hf_tokens, _ = hf_greedy(checkpoint, PROMPTS, 12)
    with LLM(str(checkpoint), device="cuda", dtype="float32", executor="uni", max_num_seqs=4, max_model_len=64,
             progress=False) as llm:
        assert llm.executor.worker.model.layers[0].self_attn.attn.backend.name == "triton"
        ours = [list(o.token_ids) for o in llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0,
                                                                                 ignore_eos=True))]
    assert ours == hf_tokens

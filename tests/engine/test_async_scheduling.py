"""Async scheduling: each decode step is launched before the previous one's tokens are read (the
tokens fed back on the device), and the outputs are exactly those of the synchronous engine.

On CPU the launched work runs at once, so these tests check the engine's side (continuations,
dropped rows of sequences that ended, blocks, preemption, aborts, seeds); on CUDA the same path
replays graphs (tests/engine/test_fused_kernels.py, bench throughput's host gap)."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.step import StepInput
from kernels.errors import InputError, QShardError
from tests.helpers import write_hf_llama

BS = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_hf_llama(tmp_path_factory.mktemp("async") / "llama", hidden=128, heads=4, kv_heads=2,
                          intermediate=256, layers=2, vocab=256, seed=5, init_std=0.1)


def make(path, async_scheduling, **kw):
    kw.setdefault("max_num_seqs", 8)
    return LLM(path, dtype="float32", device="cpu", executor="uni", progress=False, block_size=BS,
               async_scheduling=async_scheduling, **kw)


@pytest.fixture(scope="module")
def pair(checkpoint):
    with make(checkpoint, False) as sync, make(checkpoint, True) as overlapped:
        yield sync, overlapped


def prompt(i: int, n: int) -> list[int]:
    return [3 + (i * 31 + j * 7) % 240 for j in range(n)]


class Outputs(list):
    """Tokens and finish reasons compare exactly, logprobs within 1e-5 (a continued step may hold
    rows of sequences that just ended, and a batch of another size rounds the matmuls differently)."""

    def __eq__(self, other):
        return len(self) == len(other) and all(
            a[:3] == b[:3] and (a[3] is None) == (b[3] is None)
            and (a[3] is None or [list(d) for d in a[3]] == [list(d) for d in b[3]]
                 and all(pytest.approx(list(x.values()), abs=1e-5) == list(y.values()) for x, y in zip(a[3], b[3])))
            for a, b in zip(self, other))


def outputs(llm, prompts, params):
    return Outputs((o.token_ids, o.finish_reason, [c.token_ids for c in o.outputs], o.logprobs)
                   for o in llm.generate(prompts, params))


def test_off_by_default_on_cpu_and_refused_where_ranks_are_apart(checkpoint, pair):
    sync, overlapped = pair
    assert not sync.engine.async_scheduling and overlapped.engine.async_scheduling
    with make(checkpoint, None) as llm:
        assert llm.engine.async_scheduling is False  # nothing to overlap on CPU
    with pytest.raises(InputError, match="async_scheduling=True needs the uni executor"):
        LLM(checkpoint, dtype="float32", device="cpu", executor="mp", tensor_parallel_size=2, progress=False,
            async_scheduling=True)
    with pytest.raises(QShardError, match="one process only"):
        StepInput([1], [[-1]], [4], previous_rows=[0]).encode()


def test_greedy_and_seeded_outputs_equal_the_synchronous_engine(pair):
    sync, overlapped = pair
    prompts = [prompt(i, 5 + 4 * i) for i in range(6)]
    # mixed lengths end at different steps: continued rows of ended sequences are dropped
    params = [SamplingParams(max_tokens=3 + 5 * i, temperature=0, ignore_eos=True) for i in range(3)] + [
        SamplingParams(max_tokens=9, temperature=0.8, top_k=20, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=3, logprobs=2, ignore_eos=True, n=2),
        SamplingParams(max_tokens=7, temperature=0, stop_token_ids=[prompt(0, 40)[17]], ignore_eos=True)]
    before = overlapped.engine.counters["continued_steps"]
    want, got = outputs(sync, prompts, params), outputs(overlapped, prompts, params)
    assert got == want
    # the longest takes 12 decode steps after its prefill: every one but the first is a continuation,
    # also past the steps where other sequences ended (their rows are left out, or dropped)
    assert overlapped.engine.counters["continued_steps"] - before == 11
    for llm in pair:
        assert llm.engine.stats()["kv_blocks_used"] == 0
    assert overlapped.engine._in_flight is None


def test_token_counts_and_steps_match(pair):
    sync, overlapped = pair
    prompts = [prompt(i, 9) for i in range(4)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    counts = []
    for llm in pair:
        before = dict(llm.engine.counters)
        llm.generate(prompts, params)
        counts.append({k: llm.engine.counters[k] - before[k] for k in ("prefill_tokens", "decode_tokens", "steps")})
    assert counts[0] == counts[1] == {"prefill_tokens": 36, "decode_tokens": 36, "steps": 10}


def test_penalties_and_a_waiting_request_fall_back_to_synchronous_steps(pair):
    sync, overlapped = pair
    prompts = [prompt(i, 6) for i in range(3)]
    params = [SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0, frequency_penalty=0.5, ignore_eos=True)]
    before = overlapped.engine.counters["continued_steps"]
    assert outputs(overlapped, prompts, params) == outputs(sync, prompts, params)
    assert overlapped.engine.counters["continued_steps"] == before  # penalised rows need their tokens first


def test_preemption_under_a_small_cache_gives_the_same_tokens(checkpoint, pair):
    from engine.config import ModelConfig
    from engine.engine_config import EngineConfig
    from engine.kv_cache import block_bytes

    sync, _ = pair
    budget = 6 * block_bytes(EngineConfig(str(checkpoint), block_size=BS), ModelConfig.from_dir(checkpoint))
    prompts = [prompt(i, 20 + 3 * i) for i in range(5)]
    params = SamplingParams(max_tokens=18, temperature=0, ignore_eos=True)
    with make(checkpoint, True, kv_cache_memory=budget) as small:
        got = outputs(small, prompts, params)
        stats = small.engine.stats()
    assert got == outputs(sync, prompts, params)
    assert stats["preemptions"] > 0 and stats["continued_steps"] > 0 and stats["kv_blocks_used"] == 0


def test_an_abort_while_a_step_is_in_flight_frees_its_blocks(pair):
    sync, overlapped = pair
    engine = overlapped.engine
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [prompt(i, 7 + i) for i in range(3)]
    for i, p in enumerate(prompts):
        engine.add_request(f"a{i}", p, params)
    final = {}
    aborted = False
    while engine.has_unfinished():
        for out in engine.step():
            final[out.request_id] = out
        if not aborted and engine._in_flight is not None and len(final.get("a1", params).token_ids or []) >= 3:
            engine.abort("a1")
            aborted = True
    assert aborted
    want = sync.generate([prompts[0], prompts[2]], params)
    assert [final["a0"].token_ids, final["a2"].token_ids] == [w.token_ids for w in want]
    assert final["a1"].finish_reason is None and len(final["a1"].token_ids) < 12
    assert engine.stats()["kv_blocks_used"] == 0 and engine._in_flight is None


def test_the_worker_refuses_a_continuation_with_no_tokens_on_the_device(pair):
    _, overlapped = pair
    worker = overlapped.executor.worker
    worker._last_tokens = None
    with pytest.raises(QShardError, match=r"takes 2 tokens from rows \[0, 1\] of the previous step, which sampled 0"):
        worker.launch(StepInput([901, 902], [[-1], [-1]], [3, 3], sampling=[SamplingParams()] * 2,
                                block_tables=[[0], [1]], previous_rows=[0, 1]))

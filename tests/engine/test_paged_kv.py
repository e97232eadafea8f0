"""The paged KV cache end to end on a small synthetic Llama (real safetensors from transformers):
preemption by recompute under a KV budget too small for all requests, prefix caching of a
repeated system prompt, chunked prefill beside running decodes, and TP=3 (mp, gloo) == TP=1."""

from __future__ import annotations

import pytest
import torch

from engine.engine_config import EngineConfig
from engine.kv_cache import block_bytes
from engine.llm import LLM
from engine.config import ModelConfig
from engine.sampling import SamplingParams
from tests.helpers import write_hf_llama

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
BS = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 6 query heads, 3 KV heads: TP=3 splits both; head size 32 (the Triton kernels' smallest)
    return write_hf_llama(tmp_path_factory.mktemp("paged") / "llama", hidden=192, heads=6, kv_heads=3,
                          intermediate=384, layers=2, vocab=264, seed=3, init_std=0.1)


def prompt(i: int, n: int) -> list[int]:
    return [3 + (i * 37 + j * 11) % 250 for j in range(n)]


def kv_bytes(path, blocks: int, tp: int = 1) -> int:
    cfg = EngineConfig(str(path), tensor_parallel_size=tp, block_size=BS)
    return blocks * block_bytes(cfg, ModelConfig.from_dir(path))


def make(path, **kw) -> LLM:
    kw.setdefault("executor", "uni")
    return LLM(path, dtype="float32", device="cpu", progress=False, block_size=BS, **kw)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Each prompt run alone on a roomy cache without prefix caching."""
    llm = make(checkpoint, enable_prefix_caching=False)
    cache: dict[tuple, list[int]] = {}

    def alone(ids: list[int], params=GREEDY) -> list[int]:
        key = (tuple(ids), params.max_tokens)
        if key not in cache:
            cache[key] = llm.generate([ids], params)[0].token_ids
        return cache[key]

    yield alone
    llm.shutdown()


def test_preemption_by_recompute_gives_the_same_greedy_tokens(checkpoint, reference):
    prompts = [prompt(i, 20 + 3 * i) for i in range(8)]  # 20..41 tokens, + 20 generated: 3-4 blocks each
    with make(checkpoint, kv_cache_memory=kv_bytes(checkpoint, 8), max_num_seqs=8) as llm:
        assert llm.engine.stats()["kv_blocks_total"] == 8  # room for about two requests at once
        outs = llm.generate(prompts, GREEDY)
        stats = llm.engine.stats()
    assert [o.token_ids for o in outs] == [reference(p) for p in prompts]
    assert all(len(o.token_ids) == 20 for o in outs)
    assert stats["preemptions"] > 0, stats
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0


def test_prefix_cache_skips_the_repeated_system_prompt(checkpoint, reference):
    system = prompt(99, 70)  # 4 full blocks of 16 + 6 tokens
    first, second = system + prompt(1, 5), system + prompt(2, 9)
    with make(checkpoint) as llm:
        engine = llm.engine
        before = engine.stats()["prefill_tokens"]
        a = llm.generate([first], GREEDY)[0]
        after_a = engine.stats()["prefill_tokens"]
        b = llm.generate([second], GREEDY)[0]
        after_b = engine.stats()["prefill_tokens"]
        again = llm.generate([second], GREEDY)[0]  # the whole prompt's full blocks are cached now
        after_again = engine.stats()["prefill_tokens"]
        stats = engine.stats()
    assert after_a - before == len(first)
    assert after_b - after_a == len(second) - 4 * BS  # the system prompt's 4 full blocks were not prefilled
    assert after_again - after_b == len(second) - (len(second) - 1) // BS * BS
    assert a.token_ids == reference(first) and b.token_ids == reference(second) == again.token_ids
    assert stats["prefix_cache_hits"] == 4 * BS + (len(second) - 1) // BS * BS
    assert stats["prefix_cache_queries"] == len(first) + 2 * len(second)
    assert 0 < stats["prefix_cache_hit_rate"] < 1 and stats["kv_blocks_used"] == 0


class Recorder:
    """Passes steps through to the real executor and keeps them."""

    def __init__(self, executor):
        self.executor, self.steps = executor, []

    def execute(self, step):
        self.steps.append(step)
        return self.executor.execute(step)


def test_chunked_prefill_never_stalls_running_decodes(checkpoint, reference):
    budget = 24
    with make(checkpoint, max_num_batched_tokens=budget, max_num_seqs=4) as llm:
        engine = llm.engine
        recorder = engine.executor = Recorder(engine.executor)
        long_prompt = prompt(7, 100)
        engine.add_request("a", prompt(1, 10), GREEDY)
        engine.add_request("b", prompt(2, 12), GREEDY)
        engine.step()  # both prompts (22 tokens) in one step
        engine.step()
        engine.add_request("long", long_prompt, GREEDY)
        tokens: dict[str, list[int]] = {}
        lengths = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] = out.token_ids
            lengths.append({r: len(tokens.get(r, ())) for r in ("a", "b", "long")})
        long_steps = [s for s in recorder.steps[2:] if s.seq_ids and len(s.token_ids[-1]) > 1]
    # the long prompt went in chunks beside the two decodes, each step within the budget
    assert len(long_steps) == -(-100 // (budget - 2)) == 5
    for s in recorder.steps:
        assert sum(len(t) for t in s.token_ids) <= budget
    for s in long_steps:
        assert [len(t) for t in s.token_ids[:2]] == [1, 1] and len(s.token_ids[2]) <= budget - 2
        assert s.sample == [True, True, s is long_steps[-1]]
    # the decodes advanced by one token in every step while the long prompt was prefilled
    for before, after in zip(lengths, lengths[1:len(long_steps)]):
        assert after["a"] == before["a"] + 1 and after["b"] == before["b"] + 1
    assert tokens["long"] == reference(long_prompt)
    assert tokens["a"] == reference(prompt(1, 10)) and tokens["b"] == reference(prompt(2, 12))


def test_tp3_equals_tp1_with_preemption_and_chunks(checkpoint):
    prompts = [prompt(i, 15 + 9 * i) for i in range(5)]
    kw = dict(max_num_batched_tokens=32, max_num_seqs=4, enable_prefix_caching=True)
    with make(checkpoint, kv_cache_memory=kv_bytes(checkpoint, 7), **kw) as one:
        want = [o.token_ids for o in one.generate(prompts, GREEDY)]
        one_stats = one.engine.stats()
    with make(checkpoint, tensor_parallel_size=3, executor="mp", kv_cache_memory=kv_bytes(checkpoint, 7, tp=3),
              **kw) as three:
        assert three.engine.stats()["kv_blocks_total"] == 7
        got = [o.token_ids for o in three.generate(prompts, GREEDY)]
        three_stats = three.engine.stats()
    assert got == want
    assert one_stats["preemptions"] == three_stats["preemptions"] > 0
    assert three_stats["kv_blocks_used"] == 0


def test_step_input_carries_block_tables_and_sample_flags():
    from engine.step import StepInput

    step = StepInput([3, 5], [[1, 2, 3], [4]], [0, 7], [9], [False, True], None, 0,
                     block_tables=[[1, 2], [3, 4, 5]], sample=[False, True])
    back = StepInput.decode(step.encode())
    assert (back.block_tables, back.sample, back.token_ids, back.context_lens, back.finished) == (
        [[1, 2], [3, 4, 5]], [False, True], [[1, 2, 3], [4]], [0, 7], [9])


def test_triton_backend_interpreted_equals_torch(checkpoint, reference, monkeypatch):
    """The Triton paged kernels (interpreted on CPU): chunked prefill writes through rotary_kv at
    (block, offset), decode is the fused paged kernel; tokens equal the torch backend's."""
    import torch

    if torch.cuda.is_available():  # kernel modules loaded interpreted would stay so for later CUDA tests
        pytest.skip("compiled on this machine instead (test_cuda_graphs_and_fused_kernels_over_block_tables)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [prompt(i, n) for i, n in enumerate((13, 14, 30))]  # 1, 1, 2 blocks, growing to 2, 2, 3
    with make(checkpoint, kernels="triton", kv_cache_memory=kv_bytes(checkpoint, 5), max_num_batched_tokens=20,
              max_num_seqs=3) as llm:
        assert llm.executor.worker.model.layers[0].self_attn.attn.backend.name == "triton"
        got = [o.token_ids for o in llm.generate(prompts, params)]
        stats = llm.engine.stats()
    assert got == [reference(p, params) for p in prompts]
    assert stats["preemptions"] > 0 and stats["kv_blocks_used"] == 0


@pytest.mark.cuda
def test_cuda_graphs_and_fused_kernels_over_block_tables(checkpoint):
    """On a GPU: the Triton paged kernels with captured decode graphs (static block-table buffer)
    give the torch backend's eager tokens, with preemption and chunked prefill in the run, and a
    profiled cache (no kv_cache_memory) too."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    prompts = [prompt(i, 15 + 9 * i) for i in range(6)]
    tokens, stats = {}, {}
    for kernels, graphs in (("torch", False), ("triton", True), ("torch", True)):
        with LLM(checkpoint, dtype="float32", device="cuda", executor="uni", progress=False, block_size=BS,
                 kernels=kernels, cuda_graphs=graphs, kv_cache_memory=kv_bytes(checkpoint, 9),
                 max_num_batched_tokens=32, max_num_seqs=4) as llm:
            key = (kernels, True) if kernels == "torch" and graphs else kernels
            tokens[key] = [o.token_ids for o in llm.generate(prompts, GREEDY)]
            stats[key] = llm.engine.stats()
    assert tokens["triton"] == tokens["torch"]
    assert tokens[("torch", True)] == tokens["torch"]  # the torch path's key writes under graphs
    assert stats["triton"]["preemptions"] > 0 and stats["triton"]["kv_blocks_used"] == 0
    with LLM(checkpoint, dtype="float32", device="cuda", executor="uni", progress=False, block_size=BS,
             max_model_len=128, max_num_seqs=4) as llm:
        assert llm.engine.stats()["kv_blocks_total"] == 4 * 128 // BS  # profiled, clipped to what 4 x 128 need
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == tokens["torch"]


def test_lazily_zeroed_cache_zeroes_each_block_when_first_named():
    """A CPU cache over LAZY_ZERO_BYTES is allocated unwritten: whatever the memory held (NaN here)
    must never reach attention, where 0 x NaN poisons the masked sum."""
    from engine.kv_cache import LAZY_ZERO_BYTES, KVCache

    layers, heads, block, dim = 4, 2, 16, 64
    blocks = LAZY_ZERO_BYTES // (2 * layers * heads * block * dim * 4) + 1
    cache = KVCache(layers, heads, dim, torch.float32, torch.device("cpu"), blocks, block)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    cache.zero_new_blocks([[3, 5], [5, 9]])
    for b in (3, 5, 9):
        assert cache.k[:, b].eq(0).all() and cache.v[:, b].eq(0).all()
    assert cache.k[:, 4].isnan().all() and cache.v[:, 0].isnan().all()
    cache.k[:, 3] = 1.0  # written by a step: named again, it keeps its values
    cache.zero_new_blocks([[3, 4]])
    assert cache.k[:, 3].eq(1).all() and cache.k[:, 4].eq(0).all()
    # callers that drive the model with slot numbers (tests, calibration) name no block tables:
    # reserve() zeroes the blocks it hands them (the fused-kernel test read NaN garbage before)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    cache._unzeroed.fill_(True)
    cache._unzeroed_count = cache._unzeroed.numel()
    cache.reserve(2, 40)  # 3 blocks a slot: blocks 0-5
    assert cache.k[:, :6].eq(0).all() and cache.v[:, :6].eq(0).all()
    assert cache.k[:, 6].isnan().all()


def test_torch_decode_of_mixed_lengths_in_buckets_equals_attention_per_sequence():
    """The torch path groups decode sequences by length (padding under 2x) and stores keys on flat
    rows: each sequence's output equals plain float64 attention over its own keys and values."""
    from engine.batch import ForwardBatch
    from engine.kv_cache import KVCache
    from engine.layers.attention_backend import AttentionShape, PagedAttention, cache_rows

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, bs = 6, 2, 32, 4
    lens = [1, 3, 4, 9, 30, 5, 17]  # context before this step; one new token each
    cache = KVCache(1, kv_heads, dim, torch.float32, torch.device("cpu"), 64, bs)
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    order = torch.randperm(64, generator=g).tolist()
    tables, used = [], 0
    for n in lens:
        need = -(-(n + 1) // bs)
        tables.append(order[used:used + need])
        used += need
    batch = ForwardBatch.build([[7]] * len(lens), lens, tables, torch.device("cpu")).bind(cache)
    assert sorted(b.tables.shape[1] for b in batch.decode_buckets()) == [1, 2, 4, 8]
    shape = AttentionShape(0, heads, kv_heads, dim)
    qkv = torch.randn(len(lens), (heads + 2 * kv_heads) * dim, generator=g)
    q, k, v = shape.split(qkv)
    backend, out = PagedAttention(), torch.empty(len(lens), heads, dim)
    rows = cache_rows(batch, kv_heads)  # the new token's key and value, where the store puts them
    cache.k[0].view(-1, dim).index_copy_(0, rows, k.reshape(-1, dim))
    cache.v[0].view(-1, dim).index_copy_(0, rows, v.reshape(-1, dim))
    backend.decode(shape, q, out, batch, cache)
    for i, n in enumerate(lens):
        pos = torch.arange(n + 1)
        blocks = torch.tensor(tables[i])[pos // bs]
        keys = cache.k[0][blocks, :, pos % bs].double()  # [L, Hkv, D]
        values = cache.v[0][blocks, :, pos % bs].double()
        for h in range(heads):
            kv = h // (heads // kv_heads)
            p = torch.softmax(keys[:, kv] @ q[i, h].double() * shape.scale, 0)
            assert torch.allclose(out[i, h].double(), p @ values[:, kv], atol=1e-5)


def test_a_static_decode_batch_derives_its_cache_rows_again_each_step():
    """A CUDA graph replays one ForwardBatch over buffers rewritten every step: after
    clear_step_cache() (DecodeGraphs runs it inside each captured forward) the torch path stores
    the new keys at the step's blocks, not at those of the step that first derived the rows."""
    from engine.batch import ForwardBatch
    from engine.kv_cache import KVCache
    from engine.layers.attention_backend import AttentionShape, PagedAttention
    from engine.layers.rotary import RotaryEmbedding

    cache = KVCache(1, 2, 32, torch.float32, torch.device("cpu"), num_blocks=4, block_size=BS)
    inputs = torch.zeros(4, 1, dtype=torch.long)  # token, position, block, offset
    tables, lens = torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    batch = ForwardBatch.decode_view(inputs[0], inputs[1], inputs[2], inputs[3], tables, lens, BS)
    shape, rotary = AttentionShape(0, 2, 2, 32), RotaryEmbedding(32, 64, 10000.0, None, torch.float32, torch.device("cpu"))
    backend = PagedAttention()
    for block, offset in ((1, 3), (2, 5)):
        inputs[2], inputs[3], inputs[1] = block, offset, offset
        batch.clear_step_cache()
        qkv = torch.randn(1, 6 * 32)
        _, k, _ = backend.store(shape, qkv, batch, cache, rotary)
        assert torch.equal(cache.k[0, block, :, offset], k[0])


def test_equal_fresh_prompts_attend_together_as_each_alone(monkeypatch):
    """Adjacent prompts with nothing cached and equal lengths are one causal attention call; the
    output equals attending each alone, and the cache holds the same keys."""
    from engine.batch import ForwardBatch
    from engine.kv_cache import KVCache
    from engine.layers import attention_backend
    from engine.layers.attention_backend import AttentionShape, PagedAttention, fresh_prefill_runs
    from engine.layers.rotary import RotaryEmbedding

    cpu = torch.device("cpu")
    lens, contexts = [7, 7, 7, 5, 7, 1], [0, 0, 0, 0, 0, 9]  # the last one decodes after 9 cached positions
    tables = [[0], [1], [2], [3], [4], [5]]
    batch_args = ([[1] * n for n in lens], contexts, tables, cpu)
    assert fresh_prefill_runs(ForwardBatch.build(*batch_args)) == [[0, 1, 2], [3], [4]]
    shape = AttentionShape(0, 4, 2, 32)
    rotary = RotaryEmbedding(32, 64, 10000.0, None, torch.float32, cpu)
    qkv = torch.randn(sum(lens), 8 * 32, generator=torch.Generator().manual_seed(1))
    outs, caches = [], []
    for together in (True, False):
        if not together:
            monkeypatch.setattr(attention_backend, "fresh_prefill_runs",
                                lambda b: [[i] for i in b.prefill_seq_index])
        cache = KVCache(1, 2, 32, torch.float32, cpu, num_blocks=6, block_size=BS)
        cache.k.normal_(generator=torch.Generator().manual_seed(2))  # the decode row reads 9 cached positions
        outs.append(PagedAttention().attend(shape, qkv.clone(), ForwardBatch.build(*batch_args), cache, rotary))
        caches.append(cache.k.clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(caches[0], caches[1])

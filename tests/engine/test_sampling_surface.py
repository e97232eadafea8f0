"""The vLLM sampling surface: n, penalties, stop strings, logprobs, seeds, finish reasons and usage.

- Penalties change the logits exactly by the formula (crafted float32-exact logits, computed by
  hand), device sampler == reference sampler bit for bit over a multi-step run whose tokens feed
  back, sampled rows draw from the penalised distribution, counts survive a restart (preemption).
- On a small random Llama with the default model's tokenizer (real text, fast steps): n=3 with a
  seed gives 3 distinct completions, the same on a second run; completion 0 is the n=1 request;
  completion j is the n=1 request with seed completion_seed(j), penalties included; logprobs
  top-N are log_softmax top-N of the logits the sampler was given (within 1e-5); stop strings
  spanning tokens cut the text (or end it, with include_stop_str_in_output); usage counts.
- A random Llama built to repeat its last token: greedy gives one token 24 times, with
  repetition_penalty=3 24 distinct tokens none from the prompt; the reference sampler swapped into
  the worker picks the same tokens from the same logits.
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from engine import LLM
from engine.output_processor import CompletionState, OutputProcessor, RequestState
from engine.sampler import PenaltyCounts, Sampler, allowed_tokens, apply_penalties
from engine.sampling import PenaltyTokens, SamplingParams
from engine.sampling_reference import ReferenceSampler, reference_filter, reference_penalize
from engine.sequence import Sequence
from kernels.errors import InputError, QShardError
from tests.engine.test_device_sampler import CountOps, check_frequencies
from tests.helpers import write_hf_llama

# -- parameters -------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 2.0), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("repetition_penalty", float("nan")), ("presence_penalty", 2.5), ("presence_penalty", "0.1"),
    ("frequency_penalty", -2.01), ("include_stop_str_in_output", 1), ("logprobs", 21), ("logprobs", -1),
    ("top_p", 0.0), ("temperature", -0.5), ("stop", [""]), ("seed", -1),
])
def test_validation_names_the_field(field, value):
    with pytest.raises(InputError, match=rf"^SamplingParams\.{field} must be .*, got {re.escape(repr(value))}$"):
        SamplingParams(**{field: value})


def test_defaults_are_off():
    p = SamplingParams()
    assert (p.n, p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1, 1.0, 0.0, 0.0)
    assert not p.penalized and SamplingParams(presence_penalty=-0.5).penalized
    assert SamplingParams(seed=3).completion_seed(0) == 3 and SamplingParams().completion_seed(2) is None
    assert len({SamplingParams(seed=3).completion_seed(j) for j in range(100)}) == 100


# -- penalties: the formula -------------------------------------------------------------------------

# float32-exact values: every result below is exact, so equality is bit for bit
CRAFTED = torch.tensor([2.0, -1.0, 0.5, -0.25, 3.0, 0.0, 1.5, -2.0, 0.75, 1.0])
PROMPT_IDS, OUTPUT_IDS = [0, 1, 1], [2, 2, 3, 4, 2, 9]  # token 2 three times, 9 once, 0/1 prompt only
CRAFTED_PARAMS = [SamplingParams(temperature=0, repetition_penalty=2.0),
                  SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.25),
                  SamplingParams(temperature=0, repetition_penalty=0.5, frequency_penalty=-0.5, presence_penalty=1.0),
                  SamplingParams(temperature=0, frequency_penalty=2.0)]


def by_hand(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    out = []
    for t, x in enumerate(logits):
        if t in prompt or t in output:
            x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        count = output.count(t)
        out.append(x - p.frequency_penalty * count - (p.presence_penalty if count else 0.0))
    return out


def device_penalized(logits: torch.Tensor, seq_ids, params, updates) -> torch.Tensor:
    counts = PenaltyCounts()
    rows = counts.update(seq_ids, updates, logits.shape[-1], logits.device)
    values = torch.tensor([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params])
    return apply_penalties(logits, counts.counts[rows], counts.in_prompt[rows], values)


def test_penalties_change_logits_exactly_by_the_formula():
    n = len(CRAFTED_PARAMS)
    logits = CRAFTED.expand(n, -1).clone()
    want = torch.tensor([by_hand(CRAFTED.tolist(), p, PROMPT_IDS, OUTPUT_IDS) for p in CRAFTED_PARAMS])
    # e.g. repetition 2: token 0 (prompt, 2.0) -> 1.0, token 1 (prompt, -1.0) -> -2.0, token 5 (unseen) stays
    assert want[0, :2].tolist() == [1.0, -2.0] and want[0, 5] == 0.0 and want[0, 7] == -2.0
    assert want[1, 2].item() == 0.5 - 0.5 * 3 - 0.25 and want[1, 0] == 2.0  # prompt tokens: no presence/frequency
    updates = [PenaltyTokens(0, OUTPUT_IDS, PROMPT_IDS) for _ in range(n)]
    got = device_penalized(logits, list(range(n)), CRAFTED_PARAMS, updates)
    assert torch.equal(got, want)
    for i, p in enumerate(CRAFTED_PARAMS):
        assert torch.equal(reference_penalize(CRAFTED, p, PROMPT_IDS, OUTPUT_IDS), want[i])
    # the same counts reached in steps (prompt first, then one output token at a time), in one sampler
    sampler, reference = Sampler(), ReferenceSampler()
    for step in range(len(OUTPUT_IDS) + 1):
        ups = [PenaltyTokens(0, [], PROMPT_IDS) if step == 0 else PenaltyTokens(step - 1, OUTPUT_IDS[step - 1:step])
               for _ in range(n)]
        tokens, _ = sampler.sample(logits, list(range(n)), CRAFTED_PARAMS, ups)
        assert tokens == reference.sample(logits, list(range(n)), CRAFTED_PARAMS, ups)[0]
    rows = torch.tensor([sampler.penalty_counts.row_of[i] for i in range(n)])
    assert torch.equal(apply_penalties(logits, sampler.penalty_counts.counts[rows],
                                       sampler.penalty_counts.in_prompt[rows], torch.tensor(
                                           [[p.repetition_penalty, p.frequency_penalty, p.presence_penalty]
                                            for p in CRAFTED_PARAMS])), want)
    assert tokens == want.argmax(-1).tolist() != CRAFTED.argmax().expand(n).tolist()  # greedy follows the penalties


V = 50


def test_device_equals_reference_over_a_run_with_feedback():
    """Six sequences (greedy and sampled, penalised and not, bf16 logits), 16 steps; each step's
    tokens go back into the counts of both samplers. Penalised logits equal bit for bit, greedy
    tokens equal, the allowed sets after top-k/top-p equal the reference's."""
    params = [SamplingParams(temperature=0, repetition_penalty=1.7),
              SamplingParams(temperature=0, presence_penalty=1.5, frequency_penalty=0.7),
              SamplingParams(temperature=0.9, top_k=12, top_p=0.9, repetition_penalty=1.3, frequency_penalty=0.4,
                             seed=1),
              SamplingParams(temperature=0),
              SamplingParams(temperature=0, repetition_penalty=0.8, presence_penalty=-1.0, logprobs=3),
              SamplingParams(min_p=0.05, presence_penalty=2.0, seed=2)]
    prompts = [[1, 2, 3], [4, 4, 5], [6], [7, 8], [9, 10, 11, 12], [13]]
    seq_ids = [10, 11, 12, 13, 14, 15]
    outputs: list[list[int]] = [[] for _ in params]
    sampler, reference = Sampler(), ReferenceSampler()
    gen = torch.Generator().manual_seed(0)
    for step in range(16):
        logits = (torch.randn(len(params), V, generator=gen) * 2).bfloat16()
        ups = [(PenaltyTokens(0, [], prompts[i]) if step == 0 else PenaltyTokens(len(outputs[i]) - 1, outputs[i][-1:]))
               if p.penalized else None for i, p in enumerate(params)]
        tokens, logprobs = sampler.sample(logits, seq_ids, params, ups)
        ref_tokens, ref_logprobs = reference.sample(logits, seq_ids, params, ups)
        for i, p in enumerate(params):
            if p.penalized:
                row = sampler.penalty_counts.row_of[seq_ids[i]]
                pen = torch.tensor([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty]])
                got = apply_penalties(logits[i:i + 1].float(), sampler.penalty_counts.counts[row:row + 1],
                                      sampler.penalty_counts.in_prompt[row:row + 1], pen)[0]
                want = reference_penalize(logits[i], p, prompts[i], outputs[i])
                assert torch.equal(got, want), (step, i)
            else:
                want = logits[i].float()
            if p.greedy:
                assert tokens[i] == ref_tokens[i] == int(want.argmax()), (step, i)
            else:
                assert torch.equal(allowed_tokens(want[None], [p])[0], reference_filter(want, p) > float("-inf"))
                assert reference_filter(want, p)[tokens[i]] > float("-inf")  # drawn from what the filters keep
        assert logprobs[4] == ref_logprobs[4]  # raw-logit logprobs, not the penalised ones
        for i, t in enumerate(tokens):
            outputs[i].append(t)
    assert len(set(outputs[0])) > 8  # repetition 1.7 on flat logits: few repeats


def test_sampled_rows_draw_from_the_penalised_distribution():
    p = SamplingParams(temperature=0.8, top_k=30, repetition_penalty=1.5, presence_penalty=0.6, frequency_penalty=0.4)
    base = torch.randn(V, generator=torch.Generator().manual_seed(4)) * 1.5
    prompt, output = [int(base.argmax()), 3, 3], [int(base.argsort()[-2]), 7, 7, 7]
    n = 30000
    up = PenaltyTokens(0, output, prompt)
    tokens, _ = Sampler().sample(base.expand(n, V), list(range(n)), [p] * n, [up] * n)
    probs = reference_filter(reference_penalize(base, p, prompt, output), p).softmax(-1).double()
    check_frequencies(torch.tensor(tokens), probs, "penalised")
    plain = reference_filter(base, p).softmax(-1).double()
    assert 0.5 * (probs - plain).abs().sum() > 0.15  # the penalties moved the distribution (TV 0.19)


def test_penalised_sampling_does_not_sync_with_the_device():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(repetition_penalty=1.2, seed=1), SamplingParams(temperature=0),
              SamplingParams(temperature=0, presence_penalty=0.5, logprobs=2)]
    sampler = Sampler()
    # the first step allocates the count buffers (torch.zeros under a dispatch mode imports for seconds)
    sampler.sample(logits, [1, 2, 3], params, [PenaltyTokens(0, [4, 5], [1, 2]), None, PenaltyTokens(0, [], [3])])
    with CountOps() as counter:
        sampler.sample(logits, [1, 2, 3], params, [PenaltyTokens(2, [9]), None, PenaltyTokens(0, [7])])
    assert "aten.index_put_" in counter.ops
    assert not [op for op in counter.ops if op.split(".")[-1] in ("_local_scalar_dense", "nonzero", "item")]


def test_penalty_counts_restart_after_preemption_and_refuse_a_gap():
    """The driver resends prompt + output when a sequence's cache did not grow as its last step
    said (recompute after preemption); the counts then equal those of an uninterrupted run, whether
    or not the sampler forgot the sequence."""
    p = SamplingParams(temperature=0, frequency_penalty=1.0, repetition_penalty=1.2)
    seq = Sequence(7, [1, 2, 3], p)
    c = CompletionState(0, seq, None)
    first = c.penalty_tokens(3)  # prefill
    assert first == PenaltyTokens(0, [], [1, 2, 3])
    counts = PenaltyCounts()
    counts.update([7], [first], V, torch.device("cpu"))
    for t in (5, 5, 6):
        seq.num_cached += 3 if seq.num_cached == 0 else 1
        seq.output_token_ids.append(t)
        up = c.penalty_tokens(1)
        assert up.prompt is None and up.output == [t]
        counts.update([7], [up], V, torch.device("cpu"))
    row = counts.row_of[7]
    want = counts.counts[row].clone(), counts.in_prompt[row].clone()
    assert want[0][5] == 2 and want[0][6] == 1 and want[1][[1, 2, 3]].all() and want[1].sum() == 3
    for forgot in (False, True):
        seq.num_cached = 0  # preempted: recomputes prompt + output from the start
        up = c.penalty_tokens(seq.num_tokens)
        assert up == PenaltyTokens(0, [5, 5, 6], [1, 2, 3])
        if forgot:
            counts.forget(7)
            counts.update([99], [PenaltyTokens(0, [8], [9])], V, torch.device("cpu"))  # reuses row
        counts.update([7], [up], V, torch.device("cpu"))
        row = counts.row_of[7]
        assert torch.equal(counts.counts[row], want[0]) and torch.equal(counts.in_prompt[row], want[1])
        seq.num_cached = seq.num_tokens
    with pytest.raises(QShardError, match="sequence 8: the sampler counted None output tokens but the update "
                                          "starts at 2 .*must resend its prompt"):
        counts.update([8], [PenaltyTokens(2, [4])], V, torch.device("cpu"))
    with pytest.raises(QShardError, match="sequence 3 has penalties but the step carries no PenaltyTokens"):
        Sampler().sample(torch.zeros(1, V), [3], [p])


# -- stop strings, text -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def feed(tokenizer, ids, params):
    state = RequestState("r", None, Sequence(0, [1], params), tokenizer)
    processor, outs = OutputProcessor([2], 10_000), []
    for t in ids:
        state.seq.finish_reason = processor.append(state, t, None)
        outs.append(state.output())
        if outs[-1].finished:
            break
    assert "".join(o.delta for o in outs) == outs[-1].text
    return outs[-1], outs


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tokenizer, include):
    text = "The quick brown fox jumps over the lazy dog, twice over."
    ids = tokenizer(text)["input_ids"]
    pieces = [tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
    k = 6  # pieces[k] = text of the first k tokens; the stop: 2 chars of the 5th token's text, 2 of the 6th's
    stop = pieces[k - 1][-2:] + pieces[k][len(pieces[k - 1]):][:2]
    assert len(stop) == 4 and stop not in pieces[k - 1]
    start = len(pieces[k - 1]) - 2
    out, outs = feed(tokenizer, ids, SamplingParams(max_tokens=100, stop=["absent", stop],
                                                     include_stop_str_in_output=include))
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.token_ids == ids[:k]  # it stopped at the token that completed the stop string
    assert out.text == pieces[k][:start] + (stop if include else "")
    # the step before, the last len("absent") - 1 characters were held back (none with include)
    assert outs[-2].text == pieces[k - 1][:len(pieces[k - 1]) - (0 if include else 5)]


def test_stop_token_text_with_include_stop_str(tokenizer):
    ids = tokenizer("Paris is the capital of France.")["input_ids"]
    for include, want in ((False, tokenizer.decode(ids[:3])), (True, tokenizer.decode(ids[:4]))):
        out, _ = feed(tokenizer, ids, SamplingParams(max_tokens=100, stop_token_ids=[ids[3]],
                                                     include_stop_str_in_output=include))
        assert (out.text, out.finish_reason, out.outputs[0].stop_reason) == (want, "stop", ids[3])
    out, _ = feed(tokenizer, ids + [2], SamplingParams(max_tokens=100))
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason is None  # EOS: no stop_reason (vLLM)
    out, _ = feed(tokenizer, ids, SamplingParams(max_tokens=3))
    assert out.finish_reason == "length" and out.usage == {"prompt_tokens": 1, "completion_tokens": 3,
                                                           "total_tokens": 4}


# -- the engine on a small random Llama with a real tokenizer ----------------------------------------

@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory, default_model_dir):
    path = write_hf_llama(tmp_path_factory.mktemp("tiny-tok"), hidden=64, heads=4, kv_heads=2, intermediate=128,
                          vocab=49152, init_std=0.2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, path / name)
    with LLM(str(path), dtype="float32", progress=False) as llm:
        yield llm


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Grüße aus Köln!"]


def test_n_completions_distinct_reproducible_and_n1_unchanged(tiny_llm):
    p3 = SamplingParams(n=3, seed=5, temperature=1.0, max_tokens=10, ignore_eos=True)
    pen = SamplingParams(n=2, seed=9, temperature=0.8, max_tokens=10, ignore_eos=True, presence_penalty=1.0,
                         repetition_penalty=1.3, logprobs=2)
    first = tiny_llm.generate(PROMPTS[:2], [p3, pen])
    again = tiny_llm.generate(PROMPTS[:2], [p3, pen])
    ones = tiny_llm.generate([PROMPTS[0]] * 3 + [PROMPTS[1]] * 2,
                             [SamplingParams(n=1, seed=p3.completion_seed(j), temperature=1.0, max_tokens=10,
                                             ignore_eos=True) for j in range(3)]
                             + [SamplingParams(n=1, seed=pen.completion_seed(j), temperature=0.8, max_tokens=10,
                                               ignore_eos=True, presence_penalty=1.0, repetition_penalty=1.3,
                                               logprobs=2) for j in range(2)])
    out = first[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    texts = [c.token_ids for c in out.outputs]
    assert len({tuple(t) for t in texts}) == 3 and all(len(t) == 10 for t in texts)
    assert [[c.token_ids for c in o.outputs] for o in again] == [[c.token_ids for c in o.outputs] for o in first]
    assert (out.token_ids, out.text) == (out.outputs[0].token_ids, out.outputs[0].text)  # flat fields: completion 0
    assert [c.token_ids for c in out.outputs] == [o.token_ids for o in ones[:3]]  # n=1 unchanged, seeds derived
    assert [c.token_ids for c in first[1].outputs] == [o.token_ids for o in ones[3:]]  # penalties per sequence
    assert [c.text for c in out.outputs] == [o.text for o in ones[:3]]
    assert out.usage == {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": 30,
                         "total_tokens": len(out.prompt_token_ids) + 30}
    assert all(c.finish_reason == "length" and c.stop_reason is None for o in first for c in o.outputs)
    c = first[1].outputs[1]
    assert c.cumulative_logprob == pytest.approx(sum(lp[t] for lp, t in zip(c.logprobs, c.token_ids)), abs=1e-9)


def test_n_streams_each_completion(tiny_llm):
    engine = tiny_llm.engine
    ids = tiny_llm.tokenizer(PROMPTS[2])["input_ids"]
    engine.add_request("s", ids, SamplingParams(n=2, seed=1, max_tokens=6, ignore_eos=True), PROMPTS[2])
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert [o.finished for o in outs] == [False] * 5 + [True]
    for j in range(2):
        assert "".join(o.outputs[j].delta for o in outs) == outs[-1].outputs[j].text
        assert [len(o.outputs[j].token_ids) for o in outs] == list(range(1, 7))
    engine.add_request("a", ids, SamplingParams(n=3, max_tokens=50))
    engine.step()
    seqs = engine.requests["a"].seqs
    engine.abort("a")  # every completion leaves
    assert not engine.has_unfinished() and all(s.finish_reason == "abort" for s in seqs)
    engine.step()


@pytest.fixture(scope="module")
def repeating_llm(tmp_path_factory):
    """A tied-embedding random Llama whose layers barely touch the residual stream: its greedy
    output repeats one token forever (the logits are about the last token's embedding times itself)."""
    from safetensors.torch import load_file, save_file

    path = write_hf_llama(tmp_path_factory.mktemp("repeating"), hidden=16, heads=4, kv_heads=2, intermediate=32,
                          vocab=1024, tied=True)
    weights = load_file(path / "model.safetensors")
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = weights[name] * 0.05
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with LLM(str(path), dtype="float32", progress=False) as llm:
        yield llm


def test_repetition_penalty_greedy_repeats_less_and_equals_reference(repeating_llm, monkeypatch):
    prompt = [5, 17, 99, 3, 250]
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=r) for r in (1.0, 3.0)]
    plain, penalised = repeating_llm.generate([prompt] * 2, params)
    repeats = [len(o.token_ids) - len(set(o.token_ids)) for o in (plain, penalised)]
    assert repeats == [23, 0], (plain.token_ids, penalised.token_ids)  # one token 24 times; 24 distinct ones
    assert not set(penalised.token_ids) & set(prompt)
    monkeypatch.setattr(repeating_llm.executor.worker, "sampler", ReferenceSampler())  # the CPU reference
    ref_plain, ref_penalised = repeating_llm.generate([prompt] * 2, params)
    assert (ref_plain.token_ids, ref_penalised.token_ids) == (plain.token_ids, penalised.token_ids)


def test_logprobs_are_log_softmax_of_the_sampler_logits(tiny_llm, monkeypatch):
    sampler, seen = tiny_llm.executor.worker.sampler, []

    def recording(logits, seq_ids, params, penalties=None):
        seen.append((logits.float().clone(), list(seq_ids)))
        return Sampler.sample_on_device(sampler, logits, seq_ids, params, penalties)

    monkeypatch.setattr(sampler, "sample_on_device", recording)  # every step samples through it
    params = [SamplingParams(max_tokens=5, temperature=0, logprobs=5, ignore_eos=True),
              SamplingParams(max_tokens=5, seed=3, top_k=40, logprobs=20, ignore_eos=True, frequency_penalty=1.0),
              SamplingParams(max_tokens=5, logprobs=0, ignore_eos=True)]
    outs = tiny_llm.generate(PROMPTS, params)
    row_of = {}  # seq id -> request: the sequences are numbered in the order they were added
    first_ids = seen[0][1]
    for i, seq_id in enumerate(first_ids):
        row_of[seq_id] = i
    for step, (logits, seq_ids) in enumerate(seen):
        lp = logits.log_softmax(-1)
        for row, seq_id in enumerate(seq_ids):
            i = row_of[seq_id]
            entry, token, n = outs[i].logprobs[step], outs[i].token_ids[step], params[i].logprobs
            top = lp[row].topk(n) if n else None
            assert len(entry) in (n, n + 1) and abs(entry[token] - lp[row, token].item()) < 1e-5
            if n:
                assert set(top.indices.tolist()) <= set(entry)
                assert max(abs(entry[t] - v) for t, v in zip(top.indices.tolist(), top.values.tolist())) < 1e-5
    assert len(seen) == 5 and all(len(o.logprobs) == 5 for o in outs)


def test_stop_strings_in_generation(tiny_llm):
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    free = tiny_llm.generate(PROMPTS[1], greedy)[0]
    ids, tok = free.token_ids, tiny_llm.tokenizer
    pieces = [tok.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
    # a boundary between tokens k-1 and k (0-based) both with text, the stop: one char either side
    k = next(k for k in range(2, len(ids)) if len(pieces[k]) >= 1 and len(pieces[k + 1]) > len(pieces[k])
             and "\ufffd" not in pieces[k + 1] and pieces[k][-1] + pieces[k + 1][len(pieces[k])] not in pieces[k])
    stop = pieces[k][-1] + pieces[k + 1][len(pieces[k])]
    cut, kept = tiny_llm.generate([PROMPTS[1]] * 2, [
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=stop),
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)])
    assert cut.token_ids == kept.token_ids == ids[:k + 1]
    assert cut.text == pieces[k][:-1] and kept.text == pieces[k] + stop[1]
    assert (cut.finish_reason, cut.outputs[0].stop_reason, free.finish_reason) == ("stop", stop, "length")


def test_penalties_and_seeds_survive_preemption_and_chunked_prefill(repeating_llm):
    """A KV budget of 6 blocks of 16 for 5 sequences of 20-35 + 16 tokens, prefill in chunks of 16:
    sequences are preempted and recomputed (prompt + output sent again, the sampler's counts
    restarted from the driver's lists), and every completion equals the roomy run's."""
    from engine.config import ModelConfig
    from engine.engine_config import EngineConfig
    from engine.kv_cache import block_bytes

    path = repeating_llm.config.model_path
    prompts = [[3 + (i * 37 + j * 11) % 1000 for j in range(20 + 5 * i)] for i in range(4)]
    common = dict(max_tokens=16, ignore_eos=True)
    params = [SamplingParams(temperature=0, repetition_penalty=3.0, **common),
              SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=1.0, **common),
              SamplingParams(n=2, seed=7, temperature=0.7, repetition_penalty=2.0, **common),
              SamplingParams(temperature=0, **common)]
    block = block_bytes(EngineConfig(path, block_size=16), ModelConfig.from_dir(path))
    roomy = [[c.token_ids for c in o.outputs] for o in repeating_llm.generate(prompts, params)]
    with LLM(path, dtype="float32", progress=False, block_size=16, kv_cache_memory=6 * block, max_num_seqs=6,
             max_num_batched_tokens=16) as tight:
        executor, restarts = tight.engine.executor, []

        def recording(step):
            restarts.extend(u.start for u in step.penalties or [] if u is not None and u.prompt is not None)
            return executor.execute(step)

        tight.engine.executor = type("Recorder", (), {"execute": staticmethod(recording)})()
        got = [[c.token_ids for c in o.outputs] for o in tight.generate(prompts, params)]
        tight.engine.executor = executor
        stats = tight.engine.stats()
    assert stats["preemptions"] > 0 and stats["kv_blocks_used"] == 0, stats
    assert len(restarts) > 4 and set(restarts) == {0}  # 4 penalised sequences, some restarted after preemption
    assert got == roomy
    assert len(set(roomy[0][0])) == 16 and roomy[3][0] == [roomy[3][0][0]] * 16  # the penalty did act
    assert roomy[2][0] != roomy[2][1]


@pytest.mark.cuda
def test_penalties_on_cuda_equal_the_reference_with_one_sync_a_step():
    import warnings

    vocab, gen = 1000, torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=0, repetition_penalty=1.8), SamplingParams(temperature=0),
              SamplingParams(seed=4, top_k=40, top_p=0.9, presence_penalty=1.0, frequency_penalty=0.5, logprobs=2),
              SamplingParams(temperature=0, frequency_penalty=1.5, presence_penalty=-0.5, logprobs=0)]
    seq_ids, prompts = [1, 2, 3, 4], [[5, 6], [7], [8, 9, 10], [11]]
    outputs: list[list[int]] = [[] for _ in params]
    sampler, reference = Sampler(), ReferenceSampler()
    syncs = []
    for step in range(8):
        logits = (torch.randn(len(params), vocab, generator=gen) * 3).cuda()
        ups = [(PenaltyTokens(0, [], prompts[i]) if step == 0 else PenaltyTokens(len(outputs[i]) - 1, outputs[i][-1:]))
               if p.penalized else None for i, p in enumerate(params)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tokens, _ = sampler.sample(logits, seq_ids, params, ups)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
        ref_tokens, _ = reference.sample(logits.cpu(), seq_ids, params, ups)
        for i, p in enumerate(params):
            if p.penalized:
                row = sampler.penalty_counts.row_of[seq_ids[i]]
                pen = torch.tensor([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty]], device="cuda")
                got = apply_penalties(logits[i:i + 1], sampler.penalty_counts.counts[row:row + 1],
                                      sampler.penalty_counts.in_prompt[row:row + 1], pen)[0].cpu()
                torch.testing.assert_close(got, reference_penalize(logits[i].cpu(), p, prompts[i], outputs[i]),
                                           rtol=0, atol=1e-6)
            if p.greedy:
                assert tokens[i] == ref_tokens[i], (step, i)
        for i, t in enumerate(tokens):
            outputs[i].append(t)
    assert syncs[1:] == [1] * 7, syncs  # the token copy alone (step 0 also builds the per-row tensors)

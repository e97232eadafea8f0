"""The step engine on the default model (uni executor, float32): streaming, arrivals, abort."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams

PROMPTS = ["The capital of France is", "Grüße aus Köln! Write two emoji:", "def fibonacci(n):"]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(default_model_dir):
    with LLM(default_model_dir, dtype="float32", progress=False) as llm:
        yield llm


@pytest.fixture(scope="module")
def alone(llm):
    """Each prompt's greedy output run by itself through LLM.generate."""
    return [llm.generate(p, GREEDY)[0] for p in PROMPTS]


def ids_of(llm, prompt):
    return llm.tokenizer(prompt)["input_ids"]


def run_to_end(engine):
    """Step until the engine is empty; every output of every step, by request id."""
    outputs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


class Recorder:
    """The real executor, with every StepInput it ran kept."""

    def __init__(self, executor):
        self.executor, self.steps = executor, []

    def execute(self, step):
        self.steps.append(step)
        return self.executor.execute(step)


def test_deltas_stream_the_final_text(llm, alone):
    stop = SamplingParams(max_tokens=24, temperature=0, stop=["\n\n", "fib(", "Paris"])
    params = [GREEDY, GREEDY, stop, stop]
    for i, (prompt, p) in enumerate(zip(PROMPTS + PROMPTS[:1], params)):
        llm.engine.add_request(f"s{i}", ids_of(llm, prompt), p, prompt)
    outputs = run_to_end(llm.engine)
    want = llm.generate(PROMPTS + PROMPTS[:1], params)
    for i, w in enumerate(want):
        outs = outputs[f"s{i}"]
        final = outs[-1]
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert [len(o.token_ids) for o in outs] == list(range(1, len(outs) + 1))  # one token a step
        assert "".join(o.delta for o in outs) == final.text == w.text
        assert all(o.text == "".join(x.delta for x in outs[:j + 1]) for j, o in enumerate(outs))
        assert (final.token_ids, final.finish_reason, final.prompt) == (w.token_ids, w.finish_reason, w.prompt)
    for i in (0, 1):
        assert want[i].text == llm.tokenizer.decode(want[i].token_ids, skip_special_tokens=True)
        assert want[i].token_ids == alone[i].token_ids and want[i].finish_reason == "length"
    assert want[3].finish_reason == "stop" and want[3].text == " "  # " Paris" cut where "Paris" starts


def test_a_request_added_while_others_decode_starts_at_the_next_step(llm, alone):
    engine = llm.engine
    engine.add_request("early0", ids_of(llm, PROMPTS[0]), GREEDY)
    engine.add_request("early1", ids_of(llm, PROMPTS[1]), GREEDY)
    outputs = {}
    for _ in range(3):
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    engine.add_request("late", ids_of(llm, PROMPTS[2]), GREEDY)
    first = {out.request_id: out for out in engine.step()}
    assert set(first) == {"early0", "early1", "late"}
    assert len(first["late"].token_ids) == 1 and not first["early0"].finished and not first["early1"].finished
    assert len(first["early0"].token_ids) == 4
    for rid, out in first.items():
        outputs.setdefault(rid, []).append(out)
    for rid, outs in run_to_end(engine).items():
        outputs[rid].extend(outs)
    assert outputs["late"][-1].token_ids == alone[2].token_ids
    assert outputs["early0"][-1].token_ids == alone[0].token_ids
    assert outputs["early1"][-1].token_ids == alone[1].token_ids
    assert not engine.has_unfinished()


def test_abort_frees_the_request(llm, alone, monkeypatch):
    engine = llm.engine
    recorder = Recorder(llm.executor)
    monkeypatch.setattr(engine, "executor", recorder)
    engine.add_request("keep", ids_of(llm, PROMPTS[0]), GREEDY)
    engine.add_request("drop", ids_of(llm, PROMPTS[1]), GREEDY)
    engine.add_request("never", ids_of(llm, PROMPTS[2]), GREEDY)
    engine.abort("never")  # still waiting: it never reaches a worker
    for _ in range(2):
        assert {o.request_id for o in engine.step()} == {"keep", "drop"}
    seq_id = engine.requests["drop"].seq.seq_id
    engine.abort("drop")
    engine.abort("drop")  # twice, and unknown ids: no-ops
    engine.abort("no such request")
    outputs = run_to_end(engine)
    assert set(outputs) == {"keep"}
    assert outputs["keep"][-1].token_ids == alone[0].token_ids
    assert recorder.steps[2].finished == [seq_id] and seq_id not in recorder.steps[2].seq_ids
    assert all(seq_id not in s.seq_ids for s in recorder.steps[2:])
    assert all(engine.requests.get(r) is None for r in ("keep", "drop", "never"))
    # the engine went idle: the last finished request's cache was dropped at once
    assert recorder.steps[-1].seq_ids == [] and recorder.steps[-1].finished
    assert engine.block_manager.num_used == 0 and engine.stats()["running"] == 0  # every KV block given back


def test_add_request_refuses_bad_requests(llm):
    engine = llm.engine
    engine.add_request("dup", [1, 2, 3], GREEDY)
    try:
        with pytest.raises(ValueError, match="request 'dup' is already in the engine"):
            engine.add_request("dup", [1, 2, 3], GREEDY)
        with pytest.raises(ValueError, match="request 'x': sampling parameters are a dict"):
            engine.add_request("x", [1, 2, 3], {"max_tokens": 3})
        with pytest.raises(ValueError, match=r"request 'long': the prompt has 8192 tokens; max_model_len=8192"):
            engine.add_request("long", [1] * 8192, GREEDY)
    finally:
        engine.abort("dup")
    assert not engine.has_unfinished()

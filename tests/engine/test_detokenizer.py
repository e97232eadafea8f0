"""Incremental detokenization and the stop checks on the default model's tokenizer (no model runs)."""

from __future__ import annotations

import random

import pytest

from engine.detokenizer import REPLACEMENT, IncrementalDetokenizer
from engine.output_processor import OutputProcessor, RequestState
from engine.sampling import SamplingParams
from engine.sequence import Sequence

MULTILINGUAL = "Grüße aus Köln! 東京の天気は晴れ 🎉🚀 naïve café — 한국어 👩‍👩‍👧 ok.\n\nThe end."


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def full_decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def stream(tokenizer, ids):
    """The pieces an IncrementalDetokenizer emits, one per token, then its flush."""
    d = IncrementalDetokenizer(tokenizer)
    return [d.add(t) for t in ids] + [d.flush()]


def test_random_sequences_decode_as_a_whole(tokenizer):
    rng = random.Random(0)
    # byte-level tokens that are not whole characters (their text alone has U+FFFD): the hard part
    partial = [i for i in range(len(tokenizer)) if REPLACEMENT in tokenizer.decode([i])]
    special = tokenizer.all_special_ids
    assert len(partial) > 100 and special
    held_back = 0
    for n in range(300):
        ids = []
        for _ in range(rng.randint(1, 48)):
            r = rng.random()
            ids.append(rng.choice(partial) if r < 0.4 else rng.choice(special) if r < 0.45
                       else rng.randrange(len(tokenizer)))
        pieces = stream(tokenizer, ids)
        full = full_decode(tokenizer, ids)
        assert "".join(pieces) == full, ids
        # a delta never ends in a half character; only the flush may, and only if the full text does
        assert not any(p.endswith(REPLACEMENT) for p in pieces[:-1]), ids
        assert not pieces[-1].endswith(REPLACEMENT) or full.endswith(REPLACEMENT), ids
        held_back += sum(1 for t, p in zip(ids, pieces) if p == "" and t in partial)
    assert held_back > 100  # many tokens completed no character and were held back


def test_real_text_with_multibyte_characters(tokenizer):
    ids = tokenizer(MULTILINGUAL)["input_ids"]
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == full_decode(tokenizer, ids) == MULTILINGUAL
    assert "" in pieces[:-1]  # some emoji span several tokens: nothing shown until they complete
    assert all(REPLACEMENT not in p for p in pieces)


def test_no_tokenizer_gives_no_text():
    assert stream(None, [5, 6, 7]) == ["", "", "", ""]


# -- the stop checks --------------------------------------------------------------------------------

def run(tokenizer, ids, params, eos=(2,), max_model_len=10_000, prompt=(1,)):
    """Feed `ids` as if sampled, one per step, until a finish reason; return the last output and all."""
    state = RequestState("r", None, Sequence(0, list(prompt), params), tokenizer)
    processor, outs = OutputProcessor(list(eos), max_model_len), []
    for t in ids:
        state.seq.finish_reason = processor.append(state, t, None)
        outs.append(state.output())
        if outs[-1].finished:
            break
    assert "".join(o.delta for o in outs) == outs[-1].text
    return outs[-1], outs


def boundary_stop(tokenizer, ids, k):
    """A stop string that spans the boundary between tokens k-1 and k (two characters each side)."""
    before, after = full_decode(tokenizer, ids[:k]), full_decode(tokenizer, ids[:k + 1])
    assert len(before) >= 2 and len(after) >= len(before) + 2
    return before[-2:] + after[len(before):len(before) + 2], before[:-2]


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(tokenizer):
    ids = tokenizer(MULTILINGUAL)["input_ids"]
    k = len(ids) - 3
    stop, want = boundary_stop(tokenizer, ids, k)
    stops = ["never there", stop]
    out, outs = run(tokenizer, ids, SamplingParams(max_tokens=100, stop=stops))
    assert out.finish_reason == "stop" and out.text == want
    assert out.token_ids == ids[:k + 1]  # it stopped at the token that completed the stop string
    # one step earlier the stream held back len(longest stop) - 1 characters: the stop's first half too
    before = full_decode(tokenizer, ids[:k])
    assert outs[k - 1].text == before[:len(before) - (max(map(len, stops)) - 1)]


def test_stop_string_inside_a_multibyte_character_sequence(tokenizer):
    ids = tokenizer(MULTILINGUAL)["input_ids"]
    out, _ = run(tokenizer, ids, SamplingParams(max_tokens=100, stop=["🚀"]))
    assert out.finish_reason == "stop" and out.text == MULTILINGUAL[:MULTILINGUAL.index("🚀")]
    # the rocket's last byte-level token is where the search first sees it
    assert REPLACEMENT in full_decode(tokenizer, out.token_ids[:-1])[-1:]


def test_earlier_stop_string_in_the_list_wins(tokenizer):
    ids = tokenizer("one two three four")["input_ids"]
    out, _ = run(tokenizer, ids, SamplingParams(max_tokens=100, stop=["four", "thr"]))
    assert out.text == "one two " and out.finish_reason == "stop"
    out, _ = run(tokenizer, ids, SamplingParams(max_tokens=100, stop=["ee", "thr"]))
    # both found in the token " three": the earlier one in the list cuts (as LLM.generate always did)
    assert out.text == "one two thr" and out.finish_reason == "stop"


def test_stop_token_eos_and_lengths(tokenizer):
    ids = tokenizer("Paris is the capital of France.")["input_ids"]
    out, _ = run(tokenizer, ids + [2, 5], SamplingParams(max_tokens=100))
    assert out.finish_reason == "stop" and out.token_ids == ids + [2]
    assert out.text == full_decode(tokenizer, ids)
    out, _ = run(tokenizer, ids + [2, 5], SamplingParams(max_tokens=len(ids) + 2, ignore_eos=True))
    assert out.finish_reason == "length" and out.token_ids == ids + [2, 5]
    out, _ = run(tokenizer, ids, SamplingParams(max_tokens=100, stop_token_ids=[ids[3]]))
    assert out.finish_reason == "stop" and out.text == full_decode(tokenizer, ids[:3])
    out, _ = run(tokenizer, ids, SamplingParams(max_tokens=4))
    assert out.finish_reason == "length" and out.text == full_decode(tokenizer, ids[:4])
    out, _ = run(tokenizer, ids, SamplingParams(max_tokens=100), max_model_len=5, prompt=(1, 1))
    assert out.finish_reason == "length" and out.token_ids == ids[:3]

"""The shipped calibration set and held-out texts (issue 20): four domains in equal shares, chat
rendered through the model's own template, held-out texts that share no passage with the
calibration set; `--calib FILE[:WEIGHT]` parsing and weighted mixing."""

from __future__ import annotations

import pytest

from launch.texts import (DEFAULT_CALIBRATION_SET, DEFAULT_HELDOUT_TEXTS, calibration_mix, calibration_sources,
                          is_chat_file, parse_calibration_spec, read_conversations, read_text, render_chat,
                          split_samples, text_token_ids)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from engine.llm import load_tokenizer

    return load_tokenizer(default_model_dir)


def test_default_set_spans_four_domains_in_equal_shares(tokenizer):
    assert list(DEFAULT_CALIBRATION_SET) == ["prose", "docs", "code", "chat"]
    assert list(DEFAULT_HELDOUT_TEXTS) == ["manual", "code", "chat", "prose"]
    samples, parts = calibration_mix(calibration_sources(None), tokenizer, 64, 256)
    assert [(p.source.name, p.samples) for p in parts] == [("prose", 16), ("docs", 16), ("code", 16), ("chat", 16)]
    assert len(samples) == 64 and all(len(s) == 256 for s in samples)
    assert all(p.tokens >= 3000 for p in parts), [(p.source.name, p.tokens) for p in parts]
    # every sample is a window of its own domain's token ids, in the parts' order
    start = 0
    for part in parts:
        ids = text_token_ids(part.source.path, tokenizer)
        text = ",".join(map(str, ids))
        for sample in samples[start:start + part.samples]:
            assert ",".join(map(str, sample)) in text
        start += part.samples
    # the chat domain is rendered through the model's template (SmolLM2: <|im_start|>role ...)
    chat = samples[-16:]
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert sum(s.count(im_start) for s in chat) >= 16


def test_chat_rendering_uses_the_template_and_every_turn(tokenizer):
    conversations = read_conversations(DEFAULT_HELDOUT_TEXTS["chat"])
    rendered = render_chat(conversations, tokenizer)
    turns = sum(len(c) for c in conversations)
    assert rendered.count("<|im_start|>") == turns + sum(c[0]["role"] != "system" for c in conversations)
    assert rendered.count("<|im_end|>") == rendered.count("<|im_start|>")
    assert all(m["content"] in rendered for c in conversations for m in c)


def _chunks(text: str, size: int = 120, step: int = 400) -> list[str]:
    text = " ".join(text.split())
    return [text[i:i + size] for i in range(0, max(1, len(text) - size), step)]


def _plain(path) -> str:
    if is_chat_file(path):
        return "\n".join(m["content"] for c in read_conversations(path) for m in c)
    return read_text(path)


def test_heldout_texts_share_no_passage_with_the_calibration_set():
    calibration = " ".join(" ".join(_plain(p).split()) for p in DEFAULT_CALIBRATION_SET.values())
    for domain, path in DEFAULT_HELDOUT_TEXTS.items():
        chunks = _chunks(_plain(path))
        assert len(chunks) >= 10, domain
        shared = [c for c in chunks if c in calibration]
        assert shared == [], (domain, shared[:2])


def test_split_samples_by_weight():
    assert split_samples(64, [1, 1, 1, 1]) == [16, 16, 16, 16]
    assert split_samples(10, [2, 1]) == [7, 3]
    assert split_samples(5, [1, 1, 1]) == [2, 2, 1]  # ties: the earlier source
    assert split_samples(3, [0.25, 0.25, 0.25, 0.25, 1.0]) == [1, 0, 0, 0, 2]  # 0.375 x 4, 1.5: largest remainders
    assert sum(split_samples(97, [0.3, 1.7, 2.2])) == 97


def test_calib_spec_parsing(tmp_path):
    assert parse_calibration_spec("code.py:2") == ("code.py", 2.0)
    assert parse_calibration_spec("notes.txt:0.5") == ("notes.txt", 0.5)
    assert parse_calibration_spec("notes.txt") == ("notes.txt", 1.0)
    assert parse_calibration_spec("dir:with/colon.txt") == ("dir:with/colon.txt", 1.0)
    odd = tmp_path / "odd:3"
    odd.write_text("x")
    assert parse_calibration_spec(str(odd)) == (str(odd), 1.0)  # an existing file wins
    for bad in ("a.txt:0", "a.txt:-1", "a.txt:inf", "a.txt:nan"):
        with pytest.raises(ValueError, match="positive number"):
            parse_calibration_spec(bad)
    sources = calibration_sources(["default:2", "mine.txt:1"])
    assert [(s.label, s.weight) for s in sources] == [("prose", 0.5), ("docs", 0.5), ("code", 0.5), ("chat", 0.5),
                                                      ("mine.txt", 1.0)]
    assert [s.label for s in calibration_sources([])] == list(DEFAULT_CALIBRATION_SET)


def test_weighted_mix_of_user_files(tokenizer, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.json"
    a.write_text("alpha beta gamma delta " * 200)
    b.write_text('{"conversations": [[{"role": "user", "content": "Hello there, how are you today?"}, '
                 '{"role": "assistant", "content": "Very well, thank you for asking."}]]}')
    samples, parts = calibration_mix(calibration_sources([f"{a}:3", f"{b}:1"]), tokenizer, 8, 16, seed=5)
    assert [p.samples for p in parts] == [6, 2]
    a_ids = ",".join(map(str, text_token_ids(a, tokenizer)))
    assert all(",".join(map(str, s)) in a_ids for s in samples[:6])
    again, _ = calibration_mix(calibration_sources([f"{a}:3", f"{b}:1"]), tokenizer, 8, 16, seed=5)
    assert again == samples  # seeded windows are reproducible
    with pytest.raises(ValueError, match=r"b.json has \d+ tokens, fewer than one sample of seqlen=256"):
        calibration_mix(calibration_sources([str(a), str(b)]), tokenizer, 4, 256)
    bad = tmp_path / "bad.json"
    bad.write_text('{"conversations": [[{"role": "user"}]]}')
    with pytest.raises(ValueError, match="conversation 0 is not a non-empty list"):
        calibration_mix(calibration_sources([str(bad)]), tokenizer, 1, 4)

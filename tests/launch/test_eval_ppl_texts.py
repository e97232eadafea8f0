"""`qshard eval-ppl` over several texts and models (issue 20): one row per text, one column per
model, the geometric mean; each text's perplexity equals a run on that text alone; chat files
rendered through the template; no throughput log; bad texts refused before any model loads."""

from __future__ import annotations

import logging
import math
import re
import shutil

import pytest

from launch.cli import main
from tests.helpers import write_hf_llama


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, default_model_dir):
    path = write_hf_llama(tmp_path_factory.mktemp("tiny-ppl") / "float", hidden=64, heads=4, kv_heads=2,
                          intermediate=128, layers=1, vocab=49152, tied=True, init_std=0.05)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / f, path / f)
    return path


@pytest.fixture
def texts(tmp_path):
    prose = tmp_path / "prose.txt"
    prose.write_text("It was a bright cold day in April, and the clocks were striking thirteen. " * 12)
    chat = tmp_path / "chat.json"
    chat.write_text('{"conversations": [[{"role": "user", "content": "What is two plus two?"}, '
                    '{"role": "assistant", "content": "Two plus two is four."}], '
                    '[{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]]}')
    return prose, chat


def _eval(capsys, *argv) -> str:
    assert main(["--log-level", "INFO", "eval-ppl", "--window", "64", "--stride", "32", "--dtype", "float32",
                 "--no-progress", *argv]) == 0
    return capsys.readouterr().out


def test_several_texts_and_models(tiny_model, texts, capsys, caplog):
    prose, chat = texts
    caplog.set_level(logging.INFO)
    out = _eval(capsys, "--model", str(tiny_model), "--model", str(tiny_model), "--text", str(prose),
                "--text", str(chat))
    lines = out.strip().splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("prose.txt", "chat.json"))}
    assert set(rows) == {"prose.txt", "chat.json"}
    per_text = {name: float(row[2]) for name, row in rows.items()}
    assert all(row[2] == row[3] for row in rows.values())  # the same model twice: identical columns
    (geo,) = [line for line in lines if line.startswith("geometric mean")]
    expected = math.exp(sum(math.log(v) for v in per_text.values()) / 2)
    assert float(geo.split()[2]) == pytest.approx(expected, rel=1e-4)
    summaries = re.findall(r": ppl (\d+\.\d+) \(geometric mean of 2 texts\)", out)
    assert len(summaries) == 2 and float(summaries[0]) == pytest.approx(expected, rel=1e-4)
    assert lines[-1] == f"perplexity: {float(summaries[1]):.4f}"
    assert "tokens/s" not in caplog.text

    # each text alone gives the same perplexity as in the joint run
    for name, path in (("prose.txt", prose), ("chat.json", chat)):
        alone = _eval(capsys, "--model", str(tiny_model), "--text", str(path))
        assert float(alone.strip().splitlines()[-1].split(": ")[1]) == pytest.approx(per_text[name], rel=1e-5)
    # the chat file is scored as the template renders it: more tokens than its plain contents
    assert int(rows["chat.json"][1]) > 30


def test_default_texts_are_the_four_heldout_domains(tiny_model, capsys):
    out = _eval(capsys, "--model", str(tiny_model), "--max-windows", "1")
    labels = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in
              ("manual", "code", "chat", "prose")]
    assert labels == ["manual", "code", "chat", "prose"]
    assert "geometric mean of 4 texts" in out


def test_bad_text_refused_before_loading(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["eval-ppl", "--model", str(tiny_model), "--text", str(bad)]) == 2
    assert f"evaluation text file {bad} is not valid JSON" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["eval-ppl", "--model", str(tiny_model), "--text", str(tmp_path / "bad.json"), "--text",
                 str(empty)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err

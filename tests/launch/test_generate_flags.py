"""`qshard generate --stop / --ignore-eos` on the default model, in-process through the CLI's main()."""

from __future__ import annotations

import re

from launch.cli import main


def _generate(capsys, *flags: str) -> tuple[str, int]:
    """(generated text of the one prompt, tokens generated) as `qshard generate` prints them."""
    assert main(["--log-level", "WARNING", "generate", "--executor", "uni", "--dtype", "float32", *flags]) == 0
    out = capsys.readouterr().out
    text = out.split("\n", 1)[1].rsplit("\ntp=1", 1)[0].removesuffix("\n")
    return text, int(re.search(r"tokens=(\d+)", out).group(1))


def test_stop_cuts_the_text_where_the_stop_string_starts(model_dir, capsys):
    prompt = ["--model", str(model_dir), "--prompt", "The capital of France is", "--max-tokens", "12"]
    full, _ = _generate(capsys, *prompt)
    assert "." in full, full
    cut, tokens = _generate(capsys, *prompt, "--stop", ".", "--stop", "never-generated")
    assert cut == full[:full.index(".")]
    assert tokens < 12


def test_ignore_eos_generates_to_max_tokens(model_dir, capsys):
    chat = ["--model", str(model_dir), "--chat", "--prompt", "Say hi.", "--max-tokens", "48"]
    _, stopped = _generate(capsys, *chat)
    assert stopped < 48  # the instruct model ends its short answer with <|im_end|>
    _, tokens = _generate(capsys, *chat, "--ignore-eos")
    assert tokens == 48

"""Output paths are never destroyed: `qshard quantize` and `qshard write-random` refuse an existing
non-empty -o (unless --overwrite), the input model, a directory that contains it or lies in it, a
file, a path under a file and an unwritable place, before any calibration, with one `error:` line
and every existing file left byte-identical; --overwrite replaces an unrelated directory atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernels.errors import InputError
from quant.output_dir import atomic_directory, check_output_dir
from tests.helpers import engine_last_logits, write_hf_llama
from tests.launch.conftest import REPO, child_env

PROMPTS = [[504, 3458, 314, 260, 1254, 28]]
# fast enough that a refusal after calibration would still be seen, not waited for
QUANTIZE = ["--samples", "2", "--seqlen", "16", "--group-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_float(tmp_path_factory, model_dir) -> Path:
    """1 layer, hidden 64, SmolLM2's tokenizer (so GPTQ calibration would run on it)."""
    path = write_hf_llama(tmp_path_factory.mktemp("tiny") / "float", hidden=64, heads=4, kv_heads=2,
                          intermediate=128, layers=1, vocab=49152, tied=True, init_std=0.05)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / f, path / f)
    return path


@pytest.fixture
def layout(tmp_path, tiny_float) -> Path:
    """tmp_path/models/float (the input), tmp_path/out (an unrelated non-empty directory),
    tmp_path/file.txt."""
    shutil.copytree(tiny_float, tmp_path / "models" / "float")
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "notes.txt").write_text("keep me\n")
    (tmp_path / "out" / "sub" / "data.bin").write_bytes(bytes(range(256)))
    (tmp_path / "file.txt").write_text("a file\n")
    return tmp_path


def tree(root: Path) -> dict[str, str]:
    """Every entry under root: a file's sha256, 'dir' or the target of a link."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"-> {os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def current_umask() -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)


def cli(*argv: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "--log-level", "INFO", *argv], cwd=REPO,
                          env=child_env(**(env or {})), capture_output=True, text=True, timeout=300)
    return proc, time.monotonic() - began


def assert_refused(proc: subprocess.CompletedProcess, seconds: float, *words: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "calibration" not in proc.stderr
    assert proc.stdout == ""
    assert seconds < 30, seconds
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# (case, -o relative to the layout, extra options, words of the error line)
REFUSALS = [
    ("non-empty dir", "out", (), ("--output", "out", "is a non-empty directory; pass --overwrite")),
    ("parent of the input", "models", ("--overwrite",), ("models", "contains the input model directory")),
    ("the input", "models/float", ("--overwrite",), ("is the input model directory",)),
    ("inside the input", "models/float/q", ("--overwrite",), ("is inside the input model directory",)),
    ("link to the input", "link", ("--overwrite",), ("link", "is the input model directory")),
    ("a file", "file.txt", ("--overwrite",), ("file.txt is an existing file",)),
    ("under a file", "file.txt/q", (), ("file.txt/q is under", "file.txt, which is a file")),
    ("unwritable", "/proc/qshard-x", (), ("--output /proc/qshard-x: cannot write in /proc",)),
    ("unwritable under /sys", "/sys/qshard-x/q", (), ("--output /sys/qshard-x/q: cannot write in /sys",)),
]


@pytest.mark.parametrize("case,output,extra,words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_quantize_refuses_before_calibration_and_changes_nothing(layout, case, output, extra, words):
    (layout / "link").symlink_to(layout / "models" / "float")
    before = tree(layout)
    proc, seconds = cli("quantize", "--model", str(layout / "models" / "float"), "-o", str(layout / output),
                        *QUANTIZE, *extra)
    assert_refused(proc, seconds, *words)
    assert tree(layout) == before  # byte-identical, and no temporary directory left anywhere


def test_quantize_default_model_into_its_cache_is_refused(model_dir, tmp_path):
    """`--model default` with -o at the cache: a cache of links to the real default model's files,
    so that nothing real is at stake if the check ever fails."""
    links = tmp_path / "cache" / model_dir.name
    links.mkdir(parents=True)
    for f in model_dir.iterdir():
        (links / f.name).symlink_to(f)
    before = tree(tmp_path)
    proc, seconds = cli("quantize", "--model", "default", "-o", str(tmp_path / "cache"), "--overwrite", *QUANTIZE,
                        env={"QSHARD_CACHE": str(tmp_path / "cache")})
    assert_refused(proc, seconds, "contains the input model directory", str(links))
    assert tree(tmp_path) == before


def test_group_size_error_names_the_nearest_dividing_sizes(model_dir, tmp_path):
    proc, seconds = cli("quantize", "--model", "default", "-o", str(tmp_path / "q"), "--group-size", "7")
    assert_refused(proc, seconds)
    assert proc.stderr.strip() == ("error: --group-size 7: group_size 7 does not divide the layer's 576 input "
                                   "columns; the largest group size that divides 576 is 6 among those below 7, "
                                   "the smallest above it is 8 (hidden_size of this model)")
    assert not (tmp_path / "q").exists()


def test_overwrite_replaces_an_unrelated_directory_atomically(layout):
    out = layout / "out"
    proc, _ = cli("quantize", "--model", str(layout / "models" / "float"), "-o", str(out), "--method", "rtn",
                  "--overwrite", *QUANTIZE)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "quantize_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert sorted(p.name for p in layout.iterdir()) == ["file.txt", "models", "out"]  # no temporaries beside it
    assert out.stat().st_mode & 0o777 == 0o777 & ~current_umask()  # a plain mkdir's, not mkdtemp's 0700
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rtn 4-bit group 32 sym") and "7 linear layers, total loss" in lines[0]
    logits = engine_last_logits(out, PROMPTS)
    assert logits.shape == (1, 49152) and bool(logits.isfinite().all())


def test_loss_table_only_with_report(layout, capsys):
    from launch.cli import main

    def quantize(out: Path, *extra: str) -> str:
        assert main(["--log-level", "WARNING", "quantize", "--model", str(layout / "models" / "float"),
                     "-o", str(out), "--method", "rtn", *QUANTIZE, *extra]) == 0
        return capsys.readouterr().out

    empty = layout / "empty"
    empty.mkdir()  # an empty directory is a fine target
    assert len(quantize(empty).strip().splitlines()) == 1
    table = quantize(layout / "reported", "--report").strip().splitlines()
    assert len(table) == 2 + 7 + 1 + 1  # head, rule, 7 linears, total, summary
    assert table[2].startswith("model.layers.0.self_attn.q_proj") and table[-2].startswith("total")


# -- write-random ---------------------------------------------------------------------------------

WRITE_RANDOM = ["write-random", "--shape", "tiny", "--layers", "1", "--dtype", "float32"]


@pytest.mark.parametrize("output,extra,words", [
    ("out", (), ("is a non-empty directory; pass --overwrite",)),
    ("file.txt", ("--overwrite",), ("file.txt is an existing file",)),
    ("file.txt/q", (), ("which is a file",)),
    ("/proc/qshard-x", (), ("cannot write in /proc",)),
], ids=["non-empty dir", "a file", "under a file", "unwritable"])
def test_write_random_refuses_and_changes_nothing(layout, output, extra, words):
    before = tree(layout)
    proc, seconds = cli(*WRITE_RANDOM, "-o", str(layout / output), *extra)
    assert_refused(proc, seconds, *words)
    assert tree(layout) == before


def test_write_random_overwrite_replaces_atomically(layout):
    out = layout / "out"
    proc, _ = cli(*WRITE_RANDOM, "-o", str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert sorted(p.name for p in layout.iterdir()) == ["file.txt", "models", "out"]


# -- the shared check and atomic_directory, called directly ----------------------------------------


def test_check_output_dir_cases(layout):
    model = layout / "models" / "float"
    assert check_output_dir(layout / "new" / "deeper", overwrite=False, inputs=[model]) == layout / "new" / "deeper"
    assert not (layout / "new").exists()  # checking creates nothing
    assert check_output_dir(layout / "out", overwrite=True, inputs=[model]) == layout / "out"
    with pytest.raises(InputError, match="is a filesystem root"):
        check_output_dir("/", overwrite=True)
    with pytest.raises(InputError, match=r"^-o .*out is a non-empty directory; pass --force to replace it"):
        check_output_dir(layout / "out", overwrite=False, option="-o", overwrite_option="--force")
    with pytest.raises(InputError, match="contains the input model directory"):
        check_output_dir(layout, overwrite=True, inputs=[model])
    with pytest.raises(InputError, match="cannot write in /sys"):
        check_output_dir("/sys/kernel/qshard", overwrite=False)


def test_failed_write_leaves_the_old_directory_and_no_temporaries(layout):
    out = layout / "out"
    before = tree(layout)
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("interrupted")
    assert tree(layout) == before


def test_directory_filled_while_writing_is_not_replaced(layout):
    target = layout / "late"
    with pytest.raises(InputError, match="was filled while writing; pass --overwrite"):
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("{}")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert not any(p.name.startswith(".late-") for p in layout.iterdir())


def test_export_refuses_before_quantizing(layout):
    from quant.export import export_quantized
    from quant.gptq.packer import GPTQPacker

    calls = []
    with pytest.raises(InputError, match="is a non-empty directory"):
        export_quantized(layout / "models" / "float", layout / "out", GPTQPacker(4, 32),
                         lambda prefix, w: calls.append(prefix), progress=False)
    assert calls == []


def test_prepare_default_replaces_a_foreign_cache_directory_only_with_force(tmp_path, monkeypatch):
    from engine.default_model import DEFAULT_MODEL_NAME, prepare_default

    monkeypatch.setenv("QSHARD_CACHE", str(tmp_path))
    (tmp_path / DEFAULT_MODEL_NAME).mkdir()
    (tmp_path / DEFAULT_MODEL_NAME / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="is a non-empty directory; pass --force"):
        prepare_default()
    assert (tmp_path / DEFAULT_MODEL_NAME / "notes.txt").read_text() == "mine"

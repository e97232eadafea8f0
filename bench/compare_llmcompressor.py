"""Perplexity of the default model (SmolLM2-135M) quantized by qshard (RTN, GPTQ) and by
llm-compressor's GPTQ, on the shipped held-out text, all evaluated by qshard's engine.

Not part of the test suite; run by hand (it takes tens of minutes on a 2-core CPU; on a shared
machine set OMP_NUM_THREADS=1, measured ~3x faster there):

    python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 'llmcompressor==0.14.*' 'transformers<=5.17'
    QSHARD_CACHE=/tmp/qcache .venv/bin/python bench/compare_llmcompressor.py --llmc-python /tmp/llmc/bin/python

Several calibration sets per setting (4-bit, fake-quant checkpoints, like for like; mean and
spread per setting; window 'even' = the default evenly spaced windows, a number = `qshard
quantize --calib-seed N`'s random windows):

    OMP_NUM_THREADS=1 .venv/bin/python bench/compare_llmcompressor.py --work /tmp/qwin windows \
        --settings sym-none,asym-none,sym-weight,asym-weight --windows even,1,2 --variants qshard,qshard-nts,llmc

llm-compressor pins transformers <= 5.17, hence its own venv: this script re-runs itself there
(`llmc` sub-command) with the very same calibration samples (same tokenizer, same windows of
the same shipped text; the `windows` study hands it the token ids themselves) and the same
settings (bits, group size, symmetric, 64 x 256 tokens, dampening 0.01, block size 128,
lm_head left in float).

Evaluation: `launch.cmd_eval_ppl.perplexity` (prompt logprobs through the engine, bf16
activations on CPU) over the whole held-out text. 4-bit checkpoints are evaluated in their
packed formats (ours: GPTQ; llm-compressor: compressed-tensors pack-quantized); qshard reads
3-bit compressed-tensors from no one, so at 3 bits both tools' results are also evaluated as
"fake-quant" float checkpoints (the dequantized weights), like for like.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launch.texts import DEFAULT_CALIBRATION_TEXT, DEFAULT_HELDOUT_TEXT, calibration_samples, read_text  # noqa: E402

SAMPLES, SEQLEN, GROUP = 64, 256, 64
# the `windows` study's variants: qshard default (true-sequential), qshard --no-true-sequential,
# llm-compressor's default; "-mse": with the MSE observer (llm-compressor's memoryless_mse)
VARIANTS = ("qshard", "qshard-nts", "llmc", "qshard-mse", "qshard-nts-mse", "llmc-mse")


# -- the llm-compressor side (runs in its own venv) ---------------------------------------------


def run_llmc(args) -> None:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model_dir = Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.samples_file:  # the exact token windows qshard calibrates on
        samples = json.loads(Path(args.samples_file).read_text())
    else:
        ids = tokenizer(read_text(DEFAULT_CALIBRATION_TEXT))["input_ids"]
        samples = calibration_samples(ids, args.samples, args.seqlen)
    dataset = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    actorder = None if args.actorder in (None, "none") else args.actorder
    # observer None = compressed-tensors' default (min-max); "mse": llm-compressor's memoryless MSE
    # search with its own defaults (shrink down to 0.8 of the range, norm 2.4, patience 5).
    observer = {"minmax": None, "mse": "memoryless_mse"}[args.observer]
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=not args.asym, strategy="group",
                               group_size=args.group_size, actorder=actorder, observer=observer)
    # the modifier's own actorder defaults to "static": set it explicitly, None included
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], dampening_frac=args.damp, block_size=128, actorder=actorder)
    began = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=max(len(x) for x in samples),
            num_calibration_samples=len(samples))
    seconds = time.perf_counter() - began

    # The modules now hold the fake-quantized (dequantized) weights: save those as a float model.
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    state = model.state_dict()
    fake = Path(args.out) / "fake-quant"
    fake.mkdir(parents=True, exist_ok=True)
    save_file({n: state[n].detach().float().contiguous() for n in names}, str(fake / "model.safetensors"),
              metadata={"format": "pt"})
    for f in model_dir.iterdir():
        if f.suffix in (".json", ".jinja") and f.name != "model.safetensors.index.json":
            shutil.copy(f, fake / f.name)
    if args.bits in (2, 4, 8) and not args.fake_only:
        model.save_pretrained(Path(args.out) / "compressed", save_compressed=True)
        tokenizer.save_pretrained(Path(args.out) / "compressed")
    (Path(args.out) / "timing.json").write_text(json.dumps({"oneshot_seconds": seconds}))
    print(f"llm-compressor oneshot {args.bits}-bit: {seconds:.1f}s")


# -- the qshard side ----------------------------------------------------------------------------


class FakeQuantPacker:
    """Writes the dequantized weight as a plain float layer (no quantization_config): the
    'fake-quant' checkpoint of a calibration result."""

    method = "none"

    def pack(self, prefix, result, dtype):
        import torch

        return {f"{prefix}.weight": result.dequantize().to(torch.float32)}

    def quantization_config(self):
        return {}

    def extra_files(self):
        return []


def quantize_ours(model_dir: Path, out: Path, method: str, bits: int, sym: bool, actorder: str,
                  fake_quant: bool) -> float:
    """Calibrate + export (GPTQ format; and a fake-quant float copy at out-fake). Returns the wall
    seconds of calibration + GPTQ export; reuses a finished earlier run."""
    import torch

    from engine.calibration import LlamaCalibrationTarget
    from engine.llm import load_tokenizer
    from launch.cmd_quantize import make_packer
    from quant.calibrate import QuantArgs
    from quant.calibrate.pipeline import calibrate
    from quant.export import export_quantized

    timing = out.with_name(out.name + ".seconds")
    if timing.exists():
        return float(timing.read_text())
    began = time.perf_counter()
    qargs = QuantArgs(bits=bits, group_size=GROUP, sym=sym, actorder=actorder)
    samples = None
    if method == "gptq":
        ids = load_tokenizer(model_dir)(read_text(DEFAULT_CALIBRATION_TEXT))["input_ids"]
        samples = calibration_samples(ids, SAMPLES, SEQLEN)
    result = calibrate(LlamaCalibrationTarget(model_dir), samples, qargs, method, progress=True)
    export_quantized(model_dir, out, make_packer("gptq", qargs, True, 0.01, ["lm_head"]),
                     lambda prefix, w: result.results[prefix], progress=False)
    seconds = time.perf_counter() - began
    if fake_quant:
        export_quantized(model_dir, out.with_name(out.name + "-fake"), FakeQuantPacker(),
                         lambda prefix, w: result.results[prefix], dtype=torch.float32, progress=False)
    timing.write_text(f"{seconds:.1f}")
    return seconds


def evaluate(model: Path, dtype: str, window: int, stride: int, cache: Path) -> tuple[float, float]:
    """(perplexity, seconds), cached in `cache` (json) by model path, dtype and windows."""
    from engine import LLM
    from launch.cmd_eval_ppl import perplexity

    key = f"{model}|{dtype}|{window}|{stride}"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    if key in done:
        return tuple(done[key])
    with LLM(str(model), dtype=dtype, max_num_batched_tokens=4096, progress=False) as llm:
        ids = llm.tokenizer(read_text(DEFAULT_HELDOUT_TEXT))["input_ids"]
        r = perplexity(llm, ids, window, stride, str(model))
    done[key] = (r.perplexity, r.seconds)
    cache.write_text(json.dumps(done, indent=1))
    return r.perplexity, r.seconds


def run_llmc_subprocess(args, model_dir: Path, bits: int, sym: bool, actorder: str) -> tuple[Path, float]:
    out = args.work / f"llmc{bits}-{'sym' if sym else 'asym'}-{actorder}"
    if not (out / "timing.json").exists():
        subprocess.run([args.llmc_python, __file__, "llmc", "--model", str(model_dir), "--bits", str(bits),
                        "--actorder", actorder, "--out", str(out)] + ([] if sym else ["--asym"]),
                       check=True, env={**os.environ, "PYTHONPATH": ""})
    return out, json.loads((out / "timing.json").read_text())["oneshot_seconds"]


# (what, bits, sym, act order): the essential rows first, so that a partial run still compares
PLAN = [("float", None, None, None), ("rtn", 4, True, "none"), ("gptq", 4, True, "none"), ("llmc", 4, True, "none"),
        ("rtn", 3, True, "none"), ("gptq", 3, True, "none"), ("llmc", 3, True, "none"),
        ("gptq", 4, False, "none"), ("gptq", 4, True, "weight"), ("gptq", 4, False, "weight"),
        ("gptq", 3, False, "none"), ("llmc", 4, False, "none"), ("float32", None, None, None),
        ("llmc", 4, True, "static"),
        ("gptq", 4, True, "group")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    llmc = sub.add_parser("llmc", help="(internal) llm-compressor's GPTQ, run in its venv")
    llmc.add_argument("--model", required=True)
    llmc.add_argument("--bits", type=int, required=True)
    llmc.add_argument("--asym", action="store_true")
    llmc.add_argument("--actorder", default="none", help="none, static, weight or group")
    llmc.add_argument("--group-size", type=int, default=GROUP)
    llmc.add_argument("--samples", type=int, default=SAMPLES)
    llmc.add_argument("--seqlen", type=int, default=SEQLEN)
    llmc.add_argument("--out", required=True)
    llmc.add_argument("--samples-file", default=None, help="JSON list of token-id samples to calibrate on")
    llmc.add_argument("--observer", choices=("minmax", "mse"), default="minmax")
    llmc.add_argument("--fake-only", action="store_true", help="write only the fake-quant float checkpoint")
    llmc.add_argument("--damp", type=float, default=0.01, help="dampening fraction (GPTQModifier dampening_frac)")
    windows = sub.add_parser("windows", help="4-bit GPTQ, qshard vs llm-compressor, over several calibration "
                                             "windows; fake-quant checkpoints; table of per-window values and means")
    windows.add_argument("--settings", default="sym-none,asym-none,sym-weight,asym-weight",
                         help="comma-separated sym|asym-<act order>")
    windows.add_argument("--windows", default="even,1,2",
                         help="comma-separated: 'even' (evenly spaced, the default) or a --calib-seed")
    windows.add_argument("--variants", default="qshard,qshard-nts,llmc",
                         help=f"comma-separated, of: {', '.join(VARIANTS)}")
    windows.add_argument("--bits", type=int, default=4)
    p.add_argument("--llmc-python", default="/tmp/llmc/bin/python", help="python of the llm-compressor venv")
    p.add_argument("--work", type=Path, default=Path("/tmp/qshard-bench-quant"), help="checkpoints go here")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "quantization-ppl.md")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=1024)
    p.add_argument("--rows", type=int, default=len(PLAN), help="run only the first N entries of the plan")
    args = p.parse_args()
    if args.command == "llmc":
        run_llmc(args)
        return 0
    if args.command == "windows":
        return run_windows(args)

    from engine.default_model import prepare_default

    model_dir = prepare_default()
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "evals.json"
    rows: list[tuple[str, str, float | None, float, float]] = []  # name, evaluated as, quant s, ppl, eval s

    def record(name, how, quant_seconds, path, dtype="bfloat16"):
        ppl, eval_seconds = evaluate(path, dtype, args.window, args.stride, cache)
        rows.append((name, how, quant_seconds, ppl, eval_seconds))
        print(f"{name:<44} {how:<32} quant {quant_seconds or 0:7.1f}s  ppl {ppl:9.4f}  eval {eval_seconds:6.1f}s",
              flush=True)
        write_results(args, rows)

    for what, bits, sym, actorder in PLAN[: args.rows]:
        if what in ("float", "float32"):
            record("float (SmolLM2-135M-Instruct)", f"dense {'float32' if what == 'float32' else 'bf16'}", None,
                   model_dir, "float32" if what == "float32" else "bfloat16")
        elif what == "llmc":
            out, seconds = run_llmc_subprocess(args, model_dir, bits, sym, actorder)
            name = f"llm-compressor 0.14 GPTQ {bits}-bit g{GROUP} {'sym' if sym else 'asym'} act-order {actorder}"
            if (out / "compressed").exists():
                record(name, "compressed-tensors packed, bf16", seconds, out / "compressed")
            if bits == 3:
                record(name, "fake-quant float, bf16", seconds, out / "fake-quant")
        else:
            name = f"qshard {what.upper()} {bits}-bit g{GROUP} {'sym' if sym else 'asym'}" + \
                   (f" act-order {actorder}" if what == "gptq" else "")
            out = args.work / f"{what}{bits}-{'sym' if sym else 'asym'}-{actorder}"
            fake = bits == 3 and sym
            seconds = quantize_ours(model_dir, out, what, bits, sym, actorder, fake)
            record(name, f"gptq {'v1' if sym else 'v2'} packed, bf16", seconds, out)
            if fake:
                record(name, "fake-quant float, bf16", seconds, out.with_name(out.name + "-fake"))
    return 0


# -- the `windows` study: several calibration windows per setting, fake-quant, like for like ----


def study_samples(model_dir: Path, window: str, work: Path) -> Path:
    """The calibration samples of `window` ('even' or a seed) as a JSON file, for both tools."""
    from engine.llm import load_tokenizer
    from launch.cmd_quantize import calibration_windows

    path = work / f"samples-{window}.json"
    if not path.exists():
        ids = load_tokenizer(model_dir)(read_text(DEFAULT_CALIBRATION_TEXT))["input_ids"]
        seed = None if window == "even" else int(window)
        path.write_text(json.dumps(calibration_windows(ids, SAMPLES, SEQLEN, seed)))
    return path


def quantize_ours_fake(model_dir: Path, out: Path, samples_file: Path, bits: int, sym: bool, actorder: str,
                       true_sequential: bool, observer: str) -> float:
    """qshard GPTQ written as a fake-quant float checkpoint; returns calibration + export seconds."""
    import torch

    from engine.calibration import LlamaCalibrationTarget
    from quant.calibrate import QuantArgs
    from quant.calibrate.pipeline import calibrate
    from quant.export import export_quantized

    began = time.perf_counter()
    qargs = QuantArgs(bits=bits, group_size=GROUP, sym=sym, actorder=actorder, observer=observer)
    samples = json.loads(samples_file.read_text())
    result = calibrate(LlamaCalibrationTarget(model_dir), samples, qargs, "gptq", true_sequential=true_sequential,
                       progress=False)
    export_quantized(model_dir, out, FakeQuantPacker(), lambda prefix, w: result.results[prefix],
                     dtype=torch.float32, progress=False)
    return time.perf_counter() - began


def run_windows(args) -> int:
    """Every (window, setting, variant) once, cached in WORK/windows.json; then the table."""
    from engine.default_model import prepare_default

    model_dir = prepare_default()
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "windows.json"
    done = json.loads(store.read_text()) if store.exists() else {}
    settings, windows = args.settings.split(","), args.windows.split(",")
    variants = args.variants.split(",")
    if bad := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"unknown variants {bad}; choose from {VARIANTS}")
    for window in windows:
        samples_file = study_samples(model_dir, window, args.work)
        for setting in settings:
            side, actorder = setting.split("-", 1)
            sym = side == "sym"
            for variant in variants:
                key = f"{variant}|{args.bits}-{setting}|{window}"
                if key in done:
                    continue
                observer = "mse" if variant.endswith("-mse") else "minmax"
                out = args.work / key.replace("|", "_")
                if variant.startswith("llmc"):
                    llmc_actorder = "static" if actorder == "weight" else actorder
                    if not (out / "timing.json").exists():
                        subprocess.run([args.llmc_python, __file__, "llmc", "--model", str(model_dir), "--bits",
                                        str(args.bits), "--actorder", llmc_actorder, "--out", str(out),
                                        "--samples-file", str(samples_file), "--observer", observer, "--fake-only"]
                                       + ([] if sym else ["--asym"]), check=True, env={**os.environ, "PYTHONPATH": ""})
                    seconds = json.loads((out / "timing.json").read_text())["oneshot_seconds"]
                    model = out / "fake-quant"
                else:
                    seconds = quantize_ours_fake(model_dir, out, samples_file, args.bits, sym, actorder,
                                                 true_sequential="-nts" not in variant, observer=observer)
                    model = out
                ppl, eval_seconds = evaluate(model, "bfloat16", args.window, args.stride, args.work / "evals.json")
                done[key] = {"ppl": ppl, "quant_s": round(seconds, 1), "eval_s": round(eval_seconds, 1)}
                store.write_text(json.dumps(done, indent=1))
                print(f"{key:<40} ppl {ppl:8.4f}  quant {seconds:6.1f}s  eval {eval_seconds:5.1f}s", flush=True)
                shutil.rmtree(out, ignore_errors=True)  # 0.5 GB each; the numbers are kept
    print(windows_table(done, args.bits, settings, windows, variants))
    return 0


def windows_table(done: dict, bits: int, settings: list[str], windows: list[str], variants: list[str]) -> str:
    """Markdown: per (setting, variant) the per-window perplexities, mean, spread (max - min),
    the mean relative to llm-compressor's (same observer), and the mean quantization seconds."""
    head = " | ".join(f"window {w}" for w in windows)
    lines = [f"| setting | tool | {head} | mean | spread | vs llm-compressor | quant s |",
             "|---|---|" + "---:|" * (len(windows) + 4)]
    for setting in settings:
        for variant in variants:
            runs = [done.get(f"{variant}|{bits}-{setting}|{w}") for w in windows]
            if not any(runs):
                continue
            ppls = [r["ppl"] for r in runs if r]
            mean = sum(ppls) / len(ppls)
            reference = [done.get(f"{'llmc-mse' if variant.endswith('-mse') else 'llmc'}|{bits}-{setting}|{w}")
                         for w in windows]
            versus = ""
            if all(reference) and all(runs) and not variant.startswith("llmc"):
                ref_mean = sum(r["ppl"] for r in reference) / len(reference)
                versus = f"{100 * (mean / ref_mean - 1):+.2f} %"
            cells = " | ".join(f"{r['ppl']:.3f}" if r else "" for r in runs)
            quant_s = sum(r["quant_s"] for r in runs if r) / len(ppls)
            lines.append(f"| {bits}-bit g{GROUP} {setting} | {variant} | {cells} | {mean:.3f} | "
                         f"{max(ppls) - min(ppls):.3f} | {versus} | {quant_s:.0f} |")
    return "\n".join(lines)


def write_results(args, rows) -> None:
    import torch

    lines = [
        "# Perplexity of quantized SmolLM2-135M-Instruct (qshard vs llm-compressor)", "",
        f"Date: {datetime.date.today()}. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU, "
        f"torch {torch.__version__}; shared with other engineers' runs (timings are busy-machine timings).", "",
        f"Calibration: {SAMPLES} samples x {SEQLEN} tokens, evenly spaced windows of the shipped "
        f"`launch/data/{DEFAULT_CALIBRATION_TEXT.name}`, identical for both tools; dampening 0.01, "
        f"block size 128, lm_head in float; qshard GPTQ is true-sequential within a block.",
        f"Held-out: `launch/data/{DEFAULT_HELDOUT_TEXT.name}`, windows of {args.window} tokens every {args.stride} "
        f"(`qshard eval-ppl` code, engine prompt logprobs). quant s = calibration + export wall time "
        f"(llm-compressor: its oneshot only).", "",
        "| model | evaluated as | quant s | perplexity | eval s |", "|---|---|---:|---:|---:|"]
    for name, how, quant_seconds, ppl, eval_seconds in rows:
        q = "" if quant_seconds is None else f"{quant_seconds:.0f}"
        lines.append(f"| {name} | {how} | {q} | {ppl:.3f} | {eval_seconds:.0f} |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    sys.exit(main())

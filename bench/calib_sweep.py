"""Calibration sweep: which GPTQ defaults generalize to held-out texts of other domains.

Each point is one `qshard quantize` setting (calibration set, samples x tokens, act order,
observer, dampening, bits, group size; RTN as the baseline), calibrated in its own process and
written as a fake-quant float checkpoint (the dequantized weights, float32; like for like,
independent of the packed kernels), then evaluated with `qshard eval-ppl`'s code on the shipped
held-out texts (technical manual, source file, chat, prose: none of them in any calibration set
used here), bf16 activations. Results are cached in WORK/results.json, so a sweep can be run in
pieces, on several machines, and tabulated once:

    nice -n 10 .venv/bin/python bench/calib_sweep.py --work /tmp/sweep run --points base,rtn,alice --jobs 1
    .venv/bin/python bench/calib_sweep.py --work /tmp/sweep table --out bench/results/calibration-2026-12-02.md

`run --jobs N` runs N points at once, one torch thread each (a many-core machine; on a shared
2-core machine keep --jobs 1). Points are named `key=value` changes from BASE, joined by '+', e.g.
`actorder=weight+observer=mse`; `rtn` is round-to-nearest at BASE's bits/group/observer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# the setting every point starts from: launch/cmd_quantize.py's defaults before this sweep, on the
# new mixed calibration set, at 4-bit g64 (the default model's hidden size 576 has no g128)
BASE = {"method": "gptq", "bits": 4, "group": 64, "actorder": "none", "observer": "minmax", "damp": 0.01,
        "samples": 64, "seqlen": 256, "calib": "default", "seed": None, "sym": True, "true_sequential": True,
        "tool": "qshard"}
# short names of calibration sets for the `calib=` key ('+'-free): shipped files by domain
CALIB_SETS = {"default": ["default"], "alice": ["launch/data/calibration_alice_ch1-4.txt"],
              "docs": ["launch/data/calibration_python_docs.txt"], "code": ["launch/data/calibration_python_code.txt"]}
_TYPES = {"bits": int, "group": int, "samples": int, "seqlen": int, "damp": float, "seed": int,
          "sym": lambda v: v in ("1", "true", "True"), "true_sequential": lambda v: v in ("1", "true", "True")}


def point_settings(name: str) -> dict:
    settings = dict(BASE)
    for change in name.split("+"):
        if change in ("base", ""):
            continue
        if change == "rtn":
            settings["method"] = "rtn"
            continue
        key, _, value = change.partition("=")
        if key not in BASE:
            raise SystemExit(f"point {name!r}: unknown key {key!r}; keys: {', '.join(BASE)}")
        settings[key] = _TYPES.get(key, str)(value)
    return settings


# -- one point, in its own process -------------------------------------------------------------


def quantize_point(model_dir: Path, name: str, out: Path) -> dict:
    import torch

    from engine.calibration import LlamaCalibrationTarget
    from engine.llm import load_tokenizer
    from launch.cmd_quantize import calibration_set
    from quant.calibrate import QuantArgs
    from quant.calibrate.pipeline import calibrate
    from quant.export import export_quantized
    from bench.compare_llmcompressor import FakeQuantPacker

    s = point_settings(name)
    began = time.perf_counter()
    qargs = QuantArgs(bits=s["bits"], group_size=s["group"], sym=s["sym"], actorder=s["actorder"],
                      observer=s["observer"])
    samples = None
    if s["method"] == "gptq":
        calib = CALIB_SETS.get(s["calib"], [s["calib"]])
        samples = calibration_set([str(REPO / c) if c != "default" else c for c in calib],
                                  load_tokenizer(model_dir), s["samples"], s["seqlen"], s["seed"])
    if s["tool"] == "llmc":  # llm-compressor's GPTQModifier on the very same token windows
        return quantize_llmc(model_dir, s, samples, out)
    result = calibrate(LlamaCalibrationTarget(model_dir), samples, qargs, s["method"], percdamp=s["damp"],
                       true_sequential=s["true_sequential"], progress=False)
    export_quantized(model_dir, out, FakeQuantPacker(), lambda prefix, w: result.results[prefix],
                     dtype=torch.float32, progress=False, overwrite=True)
    return {"quant_s": round(time.perf_counter() - began, 1), "summary": result.summary()}


def quantize_llmc(model_dir: Path, s: dict, samples: list[list[int]], out: Path) -> dict:
    """bench/compare_llmcompressor.py's `llmc` step (in $LLMC_PYTHON, default this python), its
    fake-quant checkpoint moved to `out`."""
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    samples_file = out.with_suffix(".samples.json")
    samples_file.write_text(json.dumps(samples))
    work = out.with_suffix(".llmc")
    began = time.perf_counter()
    actorder = {"weight": "static"}.get(s["actorder"], s["actorder"])  # the same algorithm, its name there
    subprocess.run([os.environ.get("LLMC_PYTHON", sys.executable), str(REPO / "bench" / "compare_llmcompressor.py"),
                    "llmc", "--model", str(model_dir), "--bits", str(s["bits"]), "--group-size", str(s["group"]),
                    "--actorder", actorder, "--observer", s["observer"], "--damp", str(s["damp"]), "--out", str(work),
                    "--samples-file", str(samples_file), "--fake-only"] + ([] if s["sym"] else ["--asym"]),
                   check=True, stdout=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    (work / "fake-quant").rename(out)
    seconds = json.loads((work / "timing.json").read_text())["oneshot_seconds"]
    shutil.rmtree(work, ignore_errors=True)
    samples_file.unlink()
    return {"quant_s": round(time.perf_counter() - began, 1), "oneshot_s": round(seconds, 1)}


def evaluate(model: Path, window: int, stride: int) -> dict:
    from engine import LLM
    from launch.cmd_eval_ppl import perplexities
    from launch.texts import DEFAULT_HELDOUT_TEXTS, text_token_ids

    with LLM(str(model), dtype="bfloat16", device="cpu", max_num_batched_tokens=4096, progress=False) as llm:
        texts = {label: text_token_ids(p, llm.tokenizer) for label, p in DEFAULT_HELDOUT_TEXTS.items()}
        results = perplexities(llm, texts, window, stride, str(model))
    return {label: r.perplexity for label, r in results.items()}


def one(args) -> int:
    """(internal) quantize + evaluate one point; prints its result as one JSON line."""
    model_dir = Path(args.model)
    record = {}
    if args.point == "float":
        target = model_dir
    else:
        target = args.work / "ckpt" / args.point.replace("=", "_").replace("+", "__")
        record = quantize_point(model_dir, args.point, target)
    began = time.perf_counter()
    record["ppl"] = evaluate(target, args.window, args.stride)
    record["eval_s"] = round(time.perf_counter() - began, 1)
    if args.point != "float":
        import shutil

        shutil.rmtree(target, ignore_errors=True)  # ~0.5 GB each; the numbers are kept
    print("RESULT " + json.dumps(record), flush=True)
    return 0


# -- the driver ----------------------------------------------------------------------------------


def key_of(args, point: str) -> str:
    return f"{Path(args.model).name}|{point}|w{args.window}s{args.stride}"


def run(args) -> int:
    store = args.work / "results.json"
    args.work.mkdir(parents=True, exist_ok=True)
    done = json.loads(store.read_text()) if store.exists() else {}
    todo = [p for p in args.points.split(",") if p and key_of(args, p) not in done]
    for p in todo:
        if p != "float":
            point_settings(p)  # refuse a bad name before anything runs

    def launch(point: str):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
        log = args.work / "logs" / f"{point.replace('=', '_').replace('+', '__')}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--model", args.model,
                                   "--window", str(args.window), "--stride", str(args.stride), "one", point],
                                  stdout=subprocess.PIPE, stderr=f, text=True, env=env, cwd=REPO)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{point}: failed (exit {proc.returncode}), see {log}", flush=True)
            return point, None
        return point, json.loads(lines[-1][len("RESULT "):])

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in as_completed([pool.submit(launch, p) for p in todo]):  # each stored as soon as it is done
            point, record = future.result()
            if record is None:
                continue
            done = json.loads(store.read_text()) if store.exists() else {}
            done[key_of(args, point)] = record
            store.write_text(json.dumps(done, indent=1))
            ppl = "  ".join(f"{k} {v:.3f}" for k, v in record["ppl"].items())
            print(f"{point:<44} {ppl}  quant {record.get('quant_s', 0):.0f}s eval {record['eval_s']:.0f}s", flush=True)
    return 0


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def table(args) -> int:
    """Markdown: one row per point (per model and eval window), perplexity per held-out text,
    geometric mean, and each text's perplexity relative to RTN at the same bits/group/observer."""
    done = json.loads((args.work / "results.json").read_text())
    if args.points:  # these rows, in this order
        wanted = args.points.split(",")
        done = {k: done[k] for p in wanted for k in done if k.split("|")[1] == p}
    lines = []
    for key, record in done.items():
        model, point, windows = key.split("|")
        s = point_settings(point) if point != "float" else None
        labels = list(record["ppl"])
        if not lines:
            lines = [f"| model | point | method | bits/group | calib | samples x len | act order | observer | damp "
                     f"| {' | '.join(labels)} | geo mean | worst vs RTN | quant s |",
                     "|---|---|---|---|---|---|---|---|---|" + "---:|" * (len(labels) + 3)]
        if s is None:
            lines.append(f"| {model} | float | | | | | | | | " + " | ".join(f"{record['ppl'][t]:.3f}" for t in labels)
                         + f" | {geomean(record['ppl'].values()):.3f} | | |")
            continue
        rtn_point = "+".join(["rtn"] + [f"{k}={s[k]}" for k in ("bits", "group", "observer") if s[k] != BASE[k]])
        tool = "llm-compressor " if s["tool"] == "llmc" else ""
        rtn = done.get(f"{model}|{rtn_point}|{windows}")
        worst = ""
        if rtn and s["method"] == "gptq":
            worst = f"{max(100 * (record['ppl'][t] / rtn['ppl'][t] - 1) for t in labels):+.1f} %"
        gptq = s["method"] == "gptq"
        shape = f"{s['samples']}x{s['seqlen']}" if gptq else ""
        cells = [model, f"`{point}`", tool + s["method"], f"{s['bits']}/g{s['group']}", s["calib"] if gptq else "", shape,
                 s["actorder"] if gptq else "", s["observer"], str(s["damp"]) if gptq else ""]
        cells += [f"{record['ppl'][t]:.3f}" for t in labels]
        cells += [f"{geomean(record['ppl'].values()):.3f}", worst, str(record.get("quant_s", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/qshard-calib-sweep"))
    p.add_argument("--model", default=None, help="float model directory (default: the converted default model)")
    p.add_argument("--window", type=int, default=512, help="evaluation window (tokens)")
    p.add_argument("--stride", type=int, default=512, help="evaluation stride (tokens)")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="quantize + evaluate points (cached)")
    r.add_argument("--points", required=True, help="comma-separated point names ('float', 'rtn', 'base', key=value+...)")
    r.add_argument("--jobs", type=int, default=1, help="points at once")
    r.add_argument("--threads", type=int, default=1, help="torch threads per point")
    o = sub.add_parser("one", help="(internal) one point")
    o.add_argument("point")
    t = sub.add_parser("table", help="markdown table of the cached results")
    t.add_argument("--out", default=None)
    t.add_argument("--points", default=None, help="comma-separated points to show, in this order (default: all)")
    args = p.parse_args()
    if args.model is None:
        from engine.default_model import prepare_default

        args.model = str(prepare_default())
    return {"run": run, "one": one, "table": table}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

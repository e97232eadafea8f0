"""The throughput bench's outputs: a table on stdout, JSON, and a PNG plot (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path


def _kernels(r: dict) -> str:
    """The row's engine path: its kernels option, and whether steps were scheduled asynchronously."""
    label = r.get("kernels", "auto")
    if "async_scheduling" in r:
        label += " async" if r["async_scheduling"] else " sync"
    return label


def add_ratios(report: dict) -> None:
    """Speed-up vs TP=1 (same dtype, kernels, batch) and ratio to HF transformers, on every qshard row."""
    base = {(r["dtype"], _kernels(r), r["batch"]): r["tokens_per_s"] for r in report["results"] if r["tp"] == 1}
    hf = {(h["dtype"], h["batch"]): h["tokens_per_s"] for h in report["hf"]}
    for r in report["results"]:
        key = (r["dtype"], _kernels(r), r["batch"])
        r["speedup_vs_tp1"] = r["tokens_per_s"] / base[key] if key in base else None
        r["ratio_vs_hf"] = r["tokens_per_s"] / hf[key[0], key[2]] if (key[0], key[2]) in hf else None


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(report: dict) -> str:
    c = report["config"]
    m = report["machine"]
    head = (f"qshard bench throughput: {c['model']} executor={c['executor']} device={c['device']} "
            f"{c['input_len']} in / {c['output_len']} out tokens, greedy, warm-up excluded\n"
            f"machine: {m['cpus']} CPUs{', ' + m['gpu'] if m.get('gpu') else ''}, load average "
            f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end\n")
    lines = ["| dtype | kernels | tp | batch | tokens/s | speedup vs tp=1 | vs HF | ms/step | all-reduce ms/step "
             "| peak mem/rank MiB | tokens equal tp=1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    first = {(r["dtype"], _kernels(r), r["batch"]): r["tokens_digest"] for r in report["results"] if r["tp"] == 1}
    for h in report["hf"]:
        lines.append(f"| {h['dtype']} | - | HF | {h['batch']} | {h['tokens_per_s']:.1f} | - | 1.00 | - | - "
                     f"| {h['peak_memory_mib']:.0f} | - |")
    for r in sorted(report["results"], key=lambda r: (r["dtype"], _kernels(r), r["batch"], r["tp"])):
        mem = "/".join(f"{x['peak_memory_mib']:.0f}" for x in r["ranks"])
        same = first.get((r["dtype"], _kernels(r), r["batch"]))
        same = "-" if same is None else ("yes" if same == r["tokens_digest"] else "no")
        lines.append(f"| {r['dtype']} | {_kernels(r)} | {r['tp']} | {r['batch']} | {r['tokens_per_s']:.1f} "
                     f"| {_fmt(r['speedup_vs_tp1'], '.2f')} | {_fmt(r['ratio_vs_hf'], '.2f')} | {r['step_ms']:.1f} "
                     f"| {r['all_reduce_ms_per_step']:.2f} | {mem} | {same} |")
    lines += breakdown_table(report)
    notes = [f"HF skipped ({d}): {why}" for d, why in report.get("hf_skipped", {}).items()]
    notes += [f"failed: {f}" for f in report.get("failures", [])]
    return head + "\n".join(lines) + ("\n" + "\n".join(notes) if notes else "") + "\n"


def breakdown_table(report: dict) -> list[str]:
    """The decode step broken down (rows measured in-process on CUDA: launch.step_breakdown)."""
    rows = [r for r in report["results"] if r.get("breakdown")]
    if not rows:
        return []
    out = ["", "decode step (ms): decode tok/s from the wall clock (run less a separate prefill) and from CUDA "
               "events (first decode step's start to the last one's end); "
               "wall = GPU in the graph + GPU outside it (upload, sampling) + host gap (GPU idle); "
               "GPU in the graph = quantized matmul + dense matmul + attention + other kernels + gaps between them; "
               "floor = weights + KV cache at the mean context over the copy bandwidth",
           "| dtype | kernels | batch | decode tok/s | decode tok/s (events) | wall | GPU graph | quant mm | dense mm | attention | other "
           "| in-graph gaps | outside graph | host gap | GPU idle between steps (events) | replay() host us "
           "| launches | floor | share of floor | tokens equal |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    digests = {}
    for r in report["results"]:
        digests.setdefault((r["dtype"], r["tp"], r["batch"]), set()).add(r["tokens_digest"])
    for r in sorted(rows, key=lambda r: (r["dtype"], r["batch"], _kernels(r))):
        b = r["breakdown"]
        same = "yes" if len(digests[(r["dtype"], r["tp"], r["batch"])]) == 1 else "no"
        cells = [b.get(k) for k in ("decode_step_ms", "gpu_step_ms", "quant_matmul_ms", "dense_matmul_ms",
                                    "attention_ms", "other_ms", "in_graph_gaps_ms", "outside_graph_gpu_ms",
                                    "host_gap_ms")]
        out.append(f"| {r['dtype']} | {_kernels(r)} | {r['batch']} | {_fmt(b.get('decode_tokens_per_s'), '.1f')} | "
                   f"{_fmt(b.get('loop_tokens_per_s'), '.1f')} | "
                   + " | ".join(_fmt(c, ".3f") for c in cells)
                   + f" | {_fmt(b.get('loop_gap_ms'), '.3f')} | {_fmt(b.get('launch_host_us'), '.0f')}"
                   + f" | {_fmt(b.get('launches_per_step'), '.0f')} | {_fmt(b.get('floor_step_ms'), '.3f')} "
                   f"| {_fmt(100 * b['share_of_floor'] if b.get('share_of_floor') else None, '.0f')}% | {same} |")
    for r in rows:
        prof = r["breakdown"].get("host_profile")
        if prof:
            out += ["", f"host per decode step, {r['dtype']} kernels={_kernels(r)} batch {r['batch']} (cProfile, "
                        f"own time, inflated by the profiler): "
                    + "; ".join(f"{p['function']} {p['own_us_per_step']:.0f} us" for p in prof[:10])]
    return out


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in report["results"]})
    if not dtypes:
        return
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(11, 4 * len(dtypes)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, dtype in enumerate(dtypes):
        res = [r for r in report["results"] if r["dtype"] == dtype]
        tps = sorted({r["tp"] for r in res})
        ax_tps, ax_speed = axes[row]
        for i, b in enumerate(sorted({r["batch"] for r in res})):
            color = colors[i % len(colors)]
            pts = sorted((r["tp"], r["tokens_per_s"], r["speedup_vs_tp1"]) for r in res if r["batch"] == b)
            ax_tps.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"qshard batch {b}")
            hf = [h["tokens_per_s"] for h in report["hf"] if h["dtype"] == dtype and h["batch"] == b]
            if hf:
                ax_tps.axhline(hf[0], color=color, linestyle="--", linewidth=1, label=f"HF generate batch {b}")
            if all(p[2] is not None for p in pts):
                ax_speed.plot([p[0] for p in pts], [p[2] for p in pts], "o-", color=color, label=f"batch {b}")
        ax_speed.plot(tps, tps, ":", color="gray", label="ideal")
        for ax, title, ylabel in ((ax_tps, "throughput", "tokens/s"), (ax_speed, "speed-up vs TP=1", "×")):
            ax.set_title(f"{report['config']['model']} {dtype}: {title}")
            ax.set_xlabel("tensor-parallel size")
            ax.set_ylabel(ylabel)
            ax.set_xticks(tps)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"executor={report['config']['executor']}, {report['config']['input_len']} in / "
                 f"{report['config']['output_len']} out tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

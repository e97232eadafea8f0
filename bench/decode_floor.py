"""Batch-1 decode against its memory-bandwidth floor.

A decode step at batch 1 must read every weight the step uses once: all decoder tensors plus the
LM head (the embedding reads one row). The floor is that byte count over the device's copy
bandwidth, measured here (bytes read + written by a large device-to-device copy). Reads one or
more `qshard bench throughput` JSON files and prints batch-1 tokens/s as a share of the floor.

    python bench/decode_floor.py --model DIR --throughput OUT/graphs/throughput.json OUT/eager/throughput.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from launch.step_breakdown import copy_bandwidth  # one definition, shared with the throughput bench


def weight_bytes_per_token(model_dir: Path) -> int:
    """Bytes of every tensor a batch-1 decode step reads (the embedding table only as LM head)."""
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    total, embed = 0, 0
    has_head = False
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                size = n * torch.empty(0, dtype=_dtype(sl.get_dtype())).element_size()
                if name.endswith("embed_tokens.weight"):
                    embed = size
                    continue
                has_head |= name.startswith("lm_head")
                total += size
    if config.get("tie_word_embeddings") and not has_head:
        total += embed
    return total


def _dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
            "I64": torch.int64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
            "F8_E4M3": torch.float8_e4m3fn}[name]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--throughput", type=Path, nargs="*", default=[])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    bandwidth = copy_bandwidth(args.device)
    weights = weight_bytes_per_token(args.model)
    floor_tps = bandwidth / weights
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; weights read per token {weights / 1e9:.3f} GB; "
          f"floor {floor_tps:.1f} tokens/s at batch 1")
    rows = []
    for path in args.throughput:
        data = json.loads(path.read_text())
        for r in data["results"]:
            if r["batch"] == 1 and r["tp"] == 1:
                share = r["tokens_per_s"] / floor_tps
                rows.append({"run": str(path.parent.name), "dtype": r["dtype"], "tokens_per_s": r["tokens_per_s"],
                             "step_ms": r["step_ms"], "share_of_floor": share})
                print(f"{path.parent.name:>10} {r['dtype']}: {r['tokens_per_s']:.1f} tokens/s, "
                      f"{r['step_ms']:.2f} ms/step = {100 * share:.0f}% of the bandwidth floor")
    if args.json:
        args.json.write_text(json.dumps({"copy_bandwidth_bytes_per_s": bandwidth, "weight_bytes_per_token": weights,
                                         "floor_tokens_per_s": floor_tps, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

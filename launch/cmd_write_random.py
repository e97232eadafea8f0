"""`qshard write-random`: a random-weight checkpoint of a named shape, written as real safetensors.

    qshard write-random --shape llama-2-7b --quant gptq-w4g128 -o /tmp/llama-2-7b-gptq

For throughput and memory benchmarks that must read a real checkpoint from disk (`--shape` in
`qshard bench throughput` makes the weights in place instead). The tensors are those of
`engine.dummy.DummyWeights` (valid packed codes, small scales), written one at a time into files of
at most --shard-gb with a `model.safetensors.index.json`, so memory stays at one tensor. Written
like every qshard output (quant.output_dir): into a temporary directory renamed into place, and an
existing non-empty -o only replaced with --overwrite.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from engine.dummy import QUANTS, SHAPES

    p.add_argument("--shape", required=True, help=f"model shape: {', '.join(SHAPES)}")
    p.add_argument("--quant", default="none", help=f"quantization: {', '.join(QUANTS)}")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="dtype of float tensors (embeddings, norms, scales)")
    p.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    p.add_argument("--shard-gb", type=float, default=4.0, help="largest safetensors file, GB (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output model directory (new, or empty; an existing one needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty output directory (atomically, at the end)")


def write_random(shape: str, quant: str, out_dir: Path, dtype: str = "float16", layers: int | None = None,
                 shard_bytes: int = 4 << 30, seed: int = 0, progress: bool = True, overwrite: bool = False) -> int:
    """Write config.json and the tensors of a named shape; returns the tensor bytes. An existing
    non-empty out_dir is replaced (at the end, atomically) only with overwrite."""
    from engine.dummy import write_config
    from kernels.errors import InputError
    from quant.output_dir import atomic_directory

    out_dir = Path(out_dir)
    if layers is not None and layers < 1:
        raise InputError(f"--layers must be >= 1 (got {layers})")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_config(shape, quant, tmp)
        config_path = tmp / "config.json"
        raw = json.loads(config_path.read_text())
        raw.pop("qshard_dummy", None)  # a real checkpoint on disk, not a dummy one
        raw["torch_dtype"] = dtype
        if layers is not None:
            raw["num_hidden_layers"] = layers
        config_path.write_text(json.dumps(raw, indent=2))
        total = write_tensors(tmp, dtype, shard_bytes, seed, progress)
    logger.info("wrote %s (%s, %s): %.2f GB", out_dir, shape, quant, total / 1e9)
    return total


def write_tensors(out_dir: Path, dtype: str = "float16", shard_bytes: int = 4 << 30, seed: int = 0,
                  progress: bool = True) -> int:
    """Random valid tensors for the config.json in out_dir (engine.dummy's), written one at a time
    into safetensors files of at most shard_bytes (an index when there are several); returns the
    tensor bytes."""
    import torch
    from tqdm import tqdm

    from engine.config import ModelConfig
    from engine.dummy import DummyWeights
    from quant.export import ShardWriter

    out_dir = Path(out_dir)
    source = DummyWeights(ModelConfig.from_dir(out_dir), dtype=getattr(torch, dtype), seed=seed)
    writer = ShardWriter(out_dir, shard_bytes)
    for name in tqdm(source.names(), desc="writing tensors", unit="tensor", disable=not progress):
        writer.add({name: source.read(name, raw=True)})  # in the dtype its format stores (bnb absmax: float32)
    writer.close()
    return writer.total


def run(args) -> int:
    write_random(args.shape, args.quant, args.output, args.dtype, args.layers, int(args.shard_gb * (1 << 30)),
                 args.seed, overwrite=args.overwrite)
    return 0

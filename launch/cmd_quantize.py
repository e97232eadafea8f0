"""`qshard quantize`: GPTQ or RTN over a float checkpoint, written as GPTQ or compressed-tensors.

    qshard quantize --model M --method gptq --bits 4 --group-size 64 --sym --act-order weight --observer mse \
        [--calib FILE[:WEIGHT] ...] --samples 64 --seqlen 256 --format gptq -o OUT

Calibration runs block by block on qshard's own model (engine.calibration); the checkpoint is
written by quant.export with the format's Packer. The output path is checked before anything is
read (quant.output_dir: an existing non-empty -o needs --overwrite, one that is, contains or lies
inside the input model never is replaced). Ends with one summary line; --report adds the
per-layer loss table.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from kernels.errors import InputError
from launch.texts import DEFAULT_CALIBRATION_SET, calibration_mix, calibration_sources
from launch.texts import calibration_windows as _windows
from quant.calibrate.args import ACTORDERS, OBSERVERS, SUPPORTED_BITS, QuantArgs

logger = logging.getLogger(__name__)

FORMATS = ("gptq", "compressed-tensors")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="float HF model directory, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    p.add_argument("--bits", type=int, default=4, help=f"bits per weight: {', '.join(map(str, SUPPORTED_BITS))}")
    p.add_argument("--group-size", type=int, default=None,
                   help="input columns per scale/zero group (must divide every layer's in-features; -1: per channel; "
                        "default: 128, or the largest of 64 and 32 that divides every layer where 128 does not)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric (zero points; GPTQ writes gptq_v2)")
    # defaults chosen by bench/calib_sweep.py on held-out texts of four domains
    # (bench/results/calibration-2026-12-02.md): act order 'weight' + observer 'mse'
    p.add_argument("--act-order", choices=ACTORDERS, default="weight",
                   help="GPTQ column order: weight/static (default: act order, groups in column order, so no "
                        "g_idx permutation); group (permuted groups, g_idx); none")
    p.add_argument("--calib", action="append", default=None, metavar="FILE[:WEIGHT]",
                   help="calibration text (a .json file: chat conversations, rendered through the model's chat "
                        "template); repeat to mix several, each drawing samples in proportion to its weight "
                        "(default 1); 'default' is the shipped set: equal shares of "
                        f"{', '.join(DEFAULT_CALIBRATION_SET)} (the default when no --calib is given)")
    p.add_argument("--samples", type=int, default=64, help="calibration samples (default 64)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sample (default 256)")
    p.add_argument("--calib-seed", type=int, default=None,
                   help="pick the calibration windows at random start positions drawn with this seed "
                        "(default: evenly spaced windows over the text)")
    p.add_argument("--observer", choices=OBSERVERS, default="mse",
                   help="scale/zero of each group: mse (default: the range shrunk to minimise the group's "
                        "rounding error, as original GPTQ's mse=True), or minmax")
    p.add_argument("--format", choices=FORMATS, default="gptq", help="checkpoint format written")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output model directory (new, or empty; an existing one needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty output directory (atomically, at the end; never the "
                        "input model or a directory that contains it)")
    p.add_argument("--report", action="store_true", help="print the per-layer loss table at the end")
    p.add_argument("--skip", action="append", default=[],
                   help="leave layers whose name contains this in float (repeatable; lm_head always is)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of mean diag(H) (0.01)")
    p.add_argument("--blocksize", type=int, default=128, help="GPTQ lazy-update block size (128)")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="calibrate all modules of a block on its float forward (llm-compressor's way) instead of "
                        "one after another on the already-quantized ones")
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward batch")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--scale-dtype", choices=tuple(_DTYPES), default="float16",
                   help="dtype of scales and of the layers left in float (float16, as GPTQ checkpoints)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def calibration_windows(token_ids: list[int], num_samples: int, seqlen: int, seed: int | None) -> list[list[int]]:
    """launch.texts.calibration_windows, its input errors as InputError."""
    try:
        return _windows(token_ids, num_samples, seqlen, seed)
    except ValueError as e:
        raise InputError(str(e)) from None


def make_packer(fmt: str, args: QuantArgs, true_sequential: bool, damp: float, ignore: list[str]):
    """The format's writer: GPTQ v1 when symmetric (what every engine reads), gptq_v2 when
    asymmetric (true zero points, so zero = 0 is representable); compressed-tensors pack-quantized."""
    if fmt == "gptq":
        from quant.gptq.packer import GPTQPacker

        return GPTQPacker(bits=args.bits, group_size=args.group_size, sym=args.sym,
                          checkpoint_format="gptq" if args.sym else "gptq_v2", damp_percent=damp,
                          true_sequential=true_sequential)
    from quant.compressed_tensors.packer import CompressedTensorsPacker

    return CompressedTensorsPacker(args, ignore=ignore)


DEFAULT_GROUP_SIZES = (128, 64, 32)  # the default: the first that divides every layer's in-features


def in_features(cfg) -> list[tuple[str, int]]:
    return [("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.intermediate_size),
            ("num_attention_heads * head_dim", cfg.num_attention_heads * cfg.head_dim)]


def default_group_size(cfg) -> int:
    """128 where it divides every decoder linear's in-features (the hub's usual choice), else the
    largest of 64 and 32 that does (SmolLM2-135M's hidden size 576 takes 64); else per channel."""
    sizes = [k for _, k in in_features(cfg)]
    for g in DEFAULT_GROUP_SIZES:
        if all(k % g == 0 for k in sizes):
            if g != DEFAULT_GROUP_SIZES[0]:
                logger.info("group size %d: %d does not divide this model's in-features %s", g,
                            DEFAULT_GROUP_SIZES[0], sorted(set(sizes)))
            return g
    logger.info("group size -1 (per channel): none of %s divides this model's in-features %s",
                DEFAULT_GROUP_SIZES, sorted(set(sizes)))
    return -1


def check_group_size(cfg, args: QuantArgs) -> None:
    """Every decoder linear's in-features must be divisible by the group size (error names the
    largest that would work), checked before any weight is read."""
    for what, k in in_features(cfg):
        try:
            args.columns_per_group(k)
        except ValueError as e:
            raise InputError(f"--group-size {args.group_size}: {e} ({what} of this model)") from None


def calibration_set(specs: list[str] | None, tokenizer, samples: int, seqlen: int, seed: int | None):
    """The calibration samples of the --calib specs (launch.texts.calibration_mix), logged per
    source; file and weight errors as InputError (one `error:` line in the CLI)."""
    try:
        chosen, parts = calibration_mix(calibration_sources(specs), tokenizer, samples, seqlen, seed)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(f"--calib: {e}") from None
    for part in parts:
        logger.info("calibration: %d samples x %d tokens from %s (%s, %d tokens, weight %g, %s)", part.samples, seqlen,
                    part.source.label, part.source.path.name, part.tokens, part.source.weight,
                    "evenly spaced" if seed is None else f"seed {seed}")
    return chosen


def run(args) -> int:
    from engine.calibration import LlamaCalibrationTarget
    from engine.config import ModelConfig
    from engine.default_model import default_model_dir
    from engine.llm import load_tokenizer, resolve_model_path
    from engine.weights import CheckpointError
    from quant.calibrate.pipeline import calibrate
    from quant.export import check_not_quantized, export_quantized
    from quant.output_dir import check_output_dir

    began = time.perf_counter()
    # the output is checked before anything is read or converted (the default model's directory
    # is known before it is made)
    check_output_dir(args.output, overwrite=args.overwrite,
                     inputs=(default_model_dir() if str(args.model) == "default" else Path(args.model),))
    model_dir = resolve_model_path(args.model)
    cfg = ModelConfig.from_dir(model_dir)
    check_not_quantized(model_dir)
    if args.group_size is None:
        args.group_size = default_group_size(cfg)
    qargs = QuantArgs(bits=args.bits, group_size=args.group_size, sym=args.sym, actorder=args.act_order,
                      observer=args.observer)
    check_group_size(cfg, qargs)
    if args.samples < 1 or args.seqlen < 2:
        raise InputError(f"--samples must be >= 1 and --seqlen >= 2 (got {args.samples}, {args.seqlen})")
    ignore = ["lm_head"] + [s for s in args.skip if s != "lm_head"]
    packer = make_packer(args.format, qargs, args.true_sequential, args.damp,
                         ["lm_head"] + [f"re:.*{s.replace('.', '[.]')}.*" for s in ignore[1:]])

    samples = None
    if args.method == "gptq":
        tokenizer = load_tokenizer(Path(model_dir))
        if tokenizer is None:
            raise InputError(f"{model_dir} has no tokenizer to cut the calibration text into tokens")
        samples = calibration_set(args.calib, tokenizer, args.samples, args.seqlen, args.calib_seed)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    target = LlamaCalibrationTarget(model_dir, device=device, batch_size=args.batch_size)
    result = calibrate(target, samples, qargs, args.method, skip=ignore[1:], true_sequential=args.true_sequential,
                       blocksize=args.blocksize, percdamp=args.damp, progress=args.progress)
    del target

    def quantized(prefix: str, weight: torch.Tensor):
        r = result.results[prefix]
        if tuple(r.codes.shape) != tuple(weight.shape):
            raise CheckpointError(f"{prefix}: calibrated shape {tuple(r.codes.shape)} != checkpoint {tuple(weight.shape)}")
        return r

    export_quantized(model_dir, args.output, packer, quantized, skip=ignore, dtype=_DTYPES[args.scale_dtype],
                     progress=args.progress, overwrite=args.overwrite)
    if args.report:
        print(result.loss_table())
    if result.skipped:
        print(f"left in float: {', '.join(result.skipped)}")
    fmt = args.format + (f" ({'gptq' if qargs.sym else 'gptq_v2'})" if args.format == "gptq" else " (pack-quantized)")
    print(f"{args.method} {qargs.bits}-bit group {qargs.group_size} {'sym' if qargs.sym else 'asym'} "
          f"act-order {qargs.actorder} observer {qargs.observer} -> {args.output} [{fmt}]; "
          f"{result.summary()}; calibration {result.seconds:.1f}s, total {time.perf_counter() - began:.1f}s")
    return 0

"""Block-sequential calibration: GPTQ (or RTN) over a whole model, one decoder block at a time.

For each block: forward hooks collect the inputs of its linear layers into Hessians, each layer
is quantized, its dequantized weight is written back, and the block is run again on the
quantized weights to produce the next block's inputs. So every block is calibrated on what the
already-quantized blocks before it really produce, and only one block's activations (the
hidden states of all calibration samples) are alive at a time.

The model is reached only through the small `CalibrationTarget` protocol below: quant never
imports the engine; the engine implements the protocol for its models (engine/calibration.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
from torch import nn
from tqdm import tqdm

from quant.calibrate.args import QuantArgs, QuantResult
from quant.calibrate.gptq import gptq_quantize
from quant.calibrate.hessian import HessianAccumulator
from quant.calibrate.rtn import rtn_quantize

logger = logging.getLogger(__name__)

METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class LinearPart:
    """One checkpoint layer inside a (possibly fused) module: `prefix` (e.g.
    model.layers.0.self_attn.k_proj) owns rows `rows` of the module's [N, K] weight."""

    prefix: str
    rows: slice


@dataclass
class CalibratedLinear:
    """A linear module of a block as the pipeline sees it. Its input (first positional argument
    of `module`'s forward) is what the Hessian is accumulated from; all `parts` share it."""

    module: nn.Module
    parts: Sequence[LinearPart]
    get_weight: Callable[[], torch.Tensor]  # float [N, K], N = sum of the parts' rows
    set_weight: Callable[[torch.Tensor], None]
    in_features: int


class CalibrationTarget(Protocol):
    """A model split into blocks that run one after another on opaque hidden states."""

    num_blocks: int

    def first_block_inputs(self, samples: Sequence[Sequence[int]]) -> list[Any]:
        """Token-id samples → a list of per-batch hidden states entering block 0."""

    def run_block(self, index: int, hidden: Any) -> Any:
        """One batch's hidden state through block `index` (the block's current weights)."""

    def linears(self, index: int) -> list[CalibratedLinear]:
        """Block `index`'s linear modules, in the order the forward pass reaches them."""


@dataclass
class LayerReport:
    """What quantizing one checkpoint layer cost. `gptq_loss`: the loss GPTQ minimised (RTN:
    0.5 * ||W - Q||^2). The output errors are relative: ||X (W - Q)^T||^2 / ||X W^T||^2 over the
    calibration inputs X of this layer, for the result and for round-to-nearest on the same X
    (None without calibration data)."""

    prefix: str
    shape: tuple[int, int]
    gptq_loss: float
    output_error: float | None = None
    rtn_output_error: float | None = None
    seconds: float = 0.0


@dataclass
class CalibrationResult:
    results: dict[str, QuantResult]
    reports: list[LayerReport]
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the end of `qshard quantize`: layers, total loss and, with calibration data,
        the mean output error relative to round-to-nearest's (< 1: GPTQ did better)."""
        line = f"{len(self.reports)} linear layers, total loss {sum(r.gptq_loss for r in self.reports):.4g}"
        ratios = [r.output_error / r.rtn_output_error for r in self.reports
                  if r.output_error is not None and r.rtn_output_error]
        if ratios:
            line += f", output error {sum(ratios) / len(ratios):.3f} x RTN's (mean over layers)"
        return line

    def loss_table(self) -> str:
        """One line per layer: GPTQ loss and output errors (the closing table of `qshard quantize`)."""
        has_errors = any(r.output_error is not None for r in self.reports)
        width = max([len(r.prefix) for r in self.reports] + [5])
        head = f"{'layer':<{width}}  {'shape':>11}  {'loss':>11}"
        if has_errors:
            head += f"  {'out err':>9}  {'rtn err':>9}  {'err/rtn':>7}"
        lines = [head, "-" * len(head)]
        for r in self.reports:
            line = f"{r.prefix:<{width}}  {f'{r.shape[0]}x{r.shape[1]}':>11}  {r.gptq_loss:>11.4g}"
            if has_errors and r.output_error is not None:
                ratio = r.output_error / r.rtn_output_error if r.rtn_output_error else float("nan")
                line += f"  {r.output_error:>9.3e}  {r.rtn_output_error:>9.3e}  {ratio:>7.3f}"
            lines.append(line)
        total = sum(r.gptq_loss for r in self.reports)
        lines.append(f"{'total':<{width}}  {'':>11}  {total:>11.4g}")
        return "\n".join(lines)


def relative_output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """||X (W - Q)^T||^2 / ||X W^T||^2 from H ∝ X^T X (the scale of H cancels)."""
    w, h = weight.float(), hessian.float()
    delta = w - dequantized.float()
    signal = float(((w @ h) * w).sum(dtype=torch.float64))
    return float(((delta @ h) * delta).sum(dtype=torch.float64)) / signal if signal > 0 else 0.0


class _StopForward(Exception):
    """Raised by a hook once the module it waits for has seen its input: the rest of the block
    is not needed for that pass."""


def calibrate(target: CalibrationTarget, samples: Sequence[Sequence[int]] | None, args: QuantArgs,
              method: str = "gptq", *, skip: Iterable[str] = (), true_sequential: bool = True,
              blocksize: int = 128, percdamp: float = 0.01, progress: bool = True) -> CalibrationResult:
    """Quantize every linear part of every block of `target`.

    samples: token-id sequences (required for GPTQ; optional for RTN, where they only serve to
        report output errors). skip: substrings of checkpoint prefixes left in float.
    true_sequential: within a block, quantize its modules one after another, each calibrated on
        inputs computed with the modules before it already quantized (as the original GPTQ);
        False: every module of a block is calibrated on the block's float forward (as
        llm-compressor's sequential pipeline).
    Returns {prefix: QuantResult} and one LayerReport per quantized prefix.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "gptq" and not samples:
        raise ValueError("GPTQ needs calibration samples (token-id sequences); got none")
    skip = tuple(s for s in skip if s)
    start = time.perf_counter()
    out = CalibrationResult({}, [])
    hidden = target.first_block_inputs(samples) if samples else None

    bar = tqdm(range(target.num_blocks), desc=f"{method} blocks", unit="block", disable=not progress)
    for index in bar:
        modules = target.linears(index)
        todo = [m for m in modules if _parts_to_quantize(m, skip, out.skipped)]
        if hidden is None:
            for module in todo:
                _quantize_module(module, None, args, method, skip, blocksize, percdamp, out)
            continue
        if true_sequential:
            for module in todo:
                hessian = _collect_hessians(target, index, hidden, [module], stop_early=True)[0]
                _quantize_module(module, hessian, args, method, skip, blocksize, percdamp, out)
        else:
            hessians = _collect_hessians(target, index, hidden, todo, stop_early=False)
            for module, hessian in zip(todo, hessians):
                _quantize_module(module, hessian, args, method, skip, blocksize, percdamp, out)
        with torch.no_grad():
            hidden = [target.run_block(index, h) for h in hidden]
        bar.set_postfix(loss=f"{sum(r.gptq_loss for r in out.reports):.4g}")
    out.seconds = time.perf_counter() - start
    return out


def _parts_to_quantize(module: CalibratedLinear, skip: tuple[str, ...], skipped: list[str]) -> list[LinearPart]:
    parts = []
    for part in module.parts:
        if any(s in part.prefix for s in skip):
            if part.prefix not in skipped:
                skipped.append(part.prefix)
        else:
            parts.append(part)
    return parts


@torch.no_grad()
def _collect_hessians(target: CalibrationTarget, index: int, hidden: list[Any], modules: list[CalibratedLinear],
                      stop_early: bool) -> list[torch.Tensor]:
    """Run block `index` over every batch with input hooks on `modules`. With stop_early (one
    module), each pass stops as soon as that module has its input."""
    accumulators = [HessianAccumulator(m.in_features) for m in modules]

    def hook_for(accumulator: HessianAccumulator):
        def hook(_module, inputs):
            accumulator.add_batch(inputs[0])
            if stop_early:
                raise _StopForward

        return hook

    handles = [m.module.register_forward_pre_hook(hook_for(a)) for m, a in zip(modules, accumulators)]
    try:
        for h in hidden:
            try:
                target.run_block(index, h)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return [a.hessian for a in accumulators]


def _quantize_module(module: CalibratedLinear, hessian: torch.Tensor | None, args: QuantArgs, method: str,
                     skip: tuple[str, ...], blocksize: int, percdamp: float, out: CalibrationResult) -> None:
    """Quantize the module's parts, record their results, write the dequantized weight back."""
    weight = module.get_weight().detach().to(torch.float32)
    updated = weight.clone()
    for part in _parts_to_quantize(module, skip, out.skipped):
        began = time.perf_counter()
        w = weight[part.rows]
        if method == "gptq":
            with _one_cpu_thread(w.device):
                result = gptq_quantize(w, hessian, args, blocksize=blocksize, percdamp=percdamp, name=part.prefix)
        else:
            result = rtn_quantize(w, args)
        dequantized = result.dequantize().to(w.device)
        report = LayerReport(part.prefix, tuple(w.shape), result.loss)
        if hessian is not None:
            report.output_error = relative_output_error(w, dequantized, hessian)
            rtn = result if method == "rtn" else rtn_quantize(w, args)
            report.rtn_output_error = (report.output_error if method == "rtn"
                                       else relative_output_error(w, rtn.dequantize().to(w.device), hessian))
        report.seconds = time.perf_counter() - began
        updated[part.rows] = dequantized
        out.results[part.prefix] = _to_cpu(result)
        out.reports.append(report)
        logger.debug("%s: loss %.4g, output error %s", part.prefix, result.loss, report.output_error)
    module.set_weight(updated)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """GPTQ's column loop is thousands of small ops: on CPU, intra-op threads only add barrier
    waits (badly so on a shared machine, measured 10-30x slower), so run it on one thread."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _to_cpu(result: QuantResult) -> QuantResult:
    return QuantResult(codes=result.codes.cpu(), scales=result.scales.cpu(), zeros=result.zeros.cpu(),
                       g_idx=result.g_idx.cpu(), group_size=result.group_size, bits=result.bits, sym=result.sym,
                       loss=result.loss)

"""Backend choice for quantized matmuls: `prepare` once at load, `linear` per call.

On CUDA every layout runs the Triton kernel. On CPU, bf16 activations only (measured on a 2-core
Xeon with AMX, torch 2.13, K = N = 2048): GPTQ/AWQ/int8 go to `cpu-amx` (our AMX kernel: at
M = 1, 4.4-5.5x a dense bf16 matmul on cache-resident weights and 2.3-3.6x streaming them from
DRAM; ~2x at M = 16) where the CPU and a C compiler allow; otherwise bf16 GPTQ/AWQ go to
`cpu-int4` and per-channel 8-bit to `cpu-int8` (torch's weight-only ops: ~3x at M = 1 but slower
than dense from M = 8). What none can express (fp16/fp32 activations, FP8, odd shapes, groups
straddling 32-row runs) takes the dequantized fallback.
The dequantizing reference (kernels.reference) stays the oracle.
"""

from __future__ import annotations

import logging

import torch

from kernels import act_quant, cpu_amx, cpu_int4, cpu_int8
from kernels.layouts import AWQLayout, CodebookLayout, FP8Layout, GPTQLayout, Int8Layout, LUT4Layout
from kernels.prepared import DequantizedWeight, PreparedWeight

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "cpu-amx", "cpu-int4", "cpu-int8", "dequant")


def layout_device(layout) -> torch.device:
    if isinstance(layout, CodebookLayout):
        return layout.device
    return (layout.weight if isinstance(layout, (Int8Layout, FP8Layout)) else layout.qweight).device


def choose_backend(layout, act_dtype: torch.dtype) -> tuple[str, str]:
    """(backend, why) that `prepare(..., backend="auto")` uses."""
    device = layout_device(layout)
    if device.type == "cuda":
        return "triton", "CUDA"
    if device.type != "cpu":
        return "dequant", f"no kernel for {device.type}"
    if isinstance(layout, CodebookLayout):
        return "dequant", "no CPU codebook kernel"
    if isinstance(layout, LUT4Layout):
        return "dequant", "no CPU kernel for 4-bit lookup-table codes"
    why_amx = cpu_amx.unsupported_reason(layout, act_dtype)
    if why_amx is None:
        return "cpu-amx", "AMX kernel in bf16"
    why_int8 = cpu_int8.unsupported_reason(layout, act_dtype)
    if why_int8 is None:
        return "cpu-int8", "per-channel 8-bit in bf16"
    why_int4 = cpu_int4.unsupported_reason(layout, act_dtype)
    if why_int4 is None:
        return "cpu-int4", "GPTQ/AWQ in bf16"
    if isinstance(layout, (GPTQLayout, AWQLayout)):
        return "dequant", why_int4
    return "dequant", why_int8


def prepare(layout, act_dtype: torch.dtype, backend: str = "auto", keep_layout: bool = True,
            **options) -> PreparedWeight:
    """Make `layout` ready for `linear` with activations in `act_dtype`; call once, at load.

    backend: "auto" (the fastest correct one for the layout's device), or one by name (tests,
    benchmarks; "triton" on a CPU needs TRITON_INTERPRET=1). keep_layout=False lets CPU backends
    drop the layout (their packed form cannot be read back; `dequantize()` then raises).
    options go to the backend (triton: repack_awq=True).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    a8 = act_quant.plan(layout) if act_quant.wants_dynamic(layout) and backend == "auto" else None
    if a8 and a8[0] == "native":
        return act_quant.NativeW8A8Weight(layout, act_dtype)
    if backend == "auto":
        backend, why = choose_backend(layout, act_dtype)
        log.debug("%s %dx%d %s -> %s (%s)", type(layout).__name__, layout.out_features, layout.in_features,
                  act_dtype, backend, why)
    if backend == "triton" and isinstance(layout, CodebookLayout):
        from kernels.codebook_matmul import CodebookTritonWeight  # imports triton: only when used

        prepared = CodebookTritonWeight(layout, act_dtype, **options)
    elif backend == "triton" and isinstance(layout, LUT4Layout):
        from kernels.lut_matmul import LutTritonWeight  # imports triton: only when used

        prepared = LutTritonWeight(layout, act_dtype)
    elif backend == "triton":
        from kernels.triton_backend import TritonWeight  # imports triton: only when used

        prepared = TritonWeight(layout, act_dtype, **options)
    elif backend == "cpu-amx":
        prepared = cpu_amx.CpuAmxWeight(layout, act_dtype)
    elif backend == "cpu-int4":
        prepared = cpu_int4.CpuInt4Weight(layout, act_dtype)
    elif backend == "cpu-int8":
        prepared = cpu_int8.CpuInt8Weight(layout, act_dtype)
    else:
        prepared = DequantizedWeight(layout, act_dtype)
    if not keep_layout and prepared.backend != "dequant":
        prepared.layout = None
    if a8:  # W8A8 without a native op (CPU, old GPUs): 16-bit activations
        act_quant.log_once(a8[1])
    return prepared


def linear(x: torch.Tensor, prepared: PreparedWeight) -> torch.Tensor:
    """y = x @ W^T: x [..., K] in prepared.act_dtype → y [..., N] in the same dtype."""
    if x.dtype != prepared.act_dtype:
        raise TypeError(f"x is {x.dtype} but the weight was prepared for {prepared.act_dtype}")
    if x.shape[-1] != prepared.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {prepared.in_features}")
    if x.dim() == 2:  # the common case: skip two reshapes (a decode step makes hundreds of calls)
        return prepared.matmul(x)
    lead = x.shape[:-1]
    y = prepared.matmul(x.reshape(-1, prepared.in_features))
    return y.reshape(*lead, prepared.out_features)

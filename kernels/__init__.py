"""Quantized matmul kernels behind one dispatch: `prepare` once at load, `linear` per call.

`prepare(layout, act_dtype)` turns a canonical layout (kernels.layouts) into the form the fastest
correct backend for its device wants (Triton on CUDA; on CPU our AMX kernel, torch's packed ops or
a dequantized fallback); `linear(x, prepared)` runs it. This package imports nothing else of qshard, and
imports triton only when a Triton backend is prepared.
"""

from kernels.dispatch import BACKENDS, PreparedWeight, choose_backend, linear, prepare
from kernels.layouts import AWQLayout, FP8Layout, GPTQLayout, Int8Layout

__all__ = ["BACKENDS", "AWQLayout", "FP8Layout", "GPTQLayout", "Int8Layout", "PreparedWeight", "choose_backend", "linear",
           "prepare"]

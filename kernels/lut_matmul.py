"""Triton kernel for LUT4Layout (bitsandbytes nf4 / fp4): y = x @ W^T, W decoded in registers.

Each program owns a [BLOCK_N, BLOCK_M] tile of y^T and walks K in BLOCK_K steps, BLOCK_K dividing
the layout's blocksize so that a step lies in one absmax block per row. Per step it loads
BLOCK_K / 2 code bytes per row, splits each into its high (even k) and low (odd k) nibble, turns
the codes into table values with a four-level select tree over the code's bits (the 16 table
entries are scalars held in registers: no gather from memory), multiplies by x in a tensor-core
dot, and scales the step's partial sums by the rows' absmax once. Accumulation is float32.

Whether the kernel is interpreted follows TRITON_INTERPRET when it is first launched in each mode
(the jitted function is made per mode: triton decides at decoration time).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.layouts import LUT4Layout
from kernels.prepared import PreparedWeight

BLOCK_K_CHOICES = (64, 32, 16)  # the largest dividing the blocksize is used


def _lut_matmul(x_ptr, w_ptr, a_ptr, t_ptr, y_ptr, M, N, K,
                stride_xm, stride_w, stride_a, stride_ym,
                BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    HALF: tl.constexpr = BLOCK_K // 2
    offs_b = tl.arange(0, HALF)
    offs_k = tl.arange(0, BLOCK_K)
    # the table in registers: 16 scalars
    t0 = tl.load(t_ptr + 0)
    t1 = tl.load(t_ptr + 1)
    t2 = tl.load(t_ptr + 2)
    t3 = tl.load(t_ptr + 3)
    t4 = tl.load(t_ptr + 4)
    t5 = tl.load(t_ptr + 5)
    t6 = tl.load(t_ptr + 6)
    t7 = tl.load(t_ptr + 7)
    t8 = tl.load(t_ptr + 8)
    t9 = tl.load(t_ptr + 9)
    t10 = tl.load(t_ptr + 10)
    t11 = tl.load(t_ptr + 11)
    t12 = tl.load(t_ptr + 12)
    t13 = tl.load(t_ptr + 13)
    t14 = tl.load(t_ptr + 14)
    t15 = tl.load(t_ptr + 15)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w_ptrs = w_ptr + offs_n[:, None] * stride_w + (k0 // 2 + offs_b)[None, :]
        packed = tl.load(w_ptrs, mask=n_ok[:, None], other=0).to(tl.int32)
        codes = tl.interleave(packed >> 4, packed & 15)  # [BLOCK_N, BLOCK_K]: k even from the high nibble
        b0 = (codes & 1) != 0
        b1 = (codes & 2) != 0
        b2 = (codes & 4) != 0
        b3 = (codes & 8) != 0
        v01 = tl.where(b0, t1, t0)
        v23 = tl.where(b0, t3, t2)
        v45 = tl.where(b0, t5, t4)
        v67 = tl.where(b0, t7, t6)
        v89 = tl.where(b0, t9, t8)
        vab = tl.where(b0, t11, t10)
        vcd = tl.where(b0, t13, t12)
        vef = tl.where(b0, t15, t14)
        v03 = tl.where(b1, v23, v01)
        v47 = tl.where(b1, v67, v45)
        v8b = tl.where(b1, vab, v89)
        vcf = tl.where(b1, vef, vcd)
        v07 = tl.where(b2, v47, v03)
        v8f = tl.where(b2, vcf, v8b)
        w = tl.where(b3, v8f, v07)
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (k0 + offs_k)[:, None]
        x = tl.load(x_ptrs, mask=m_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        if DOT_F32:
            part = tl.dot(w, x.to(tl.float32), input_precision="ieee")  # not tf32: float32 means float32
        else:
            part = tl.dot(w.to(x.dtype), x)
        scale = tl.load(a_ptr + offs_n * stride_a + k0 // BLOCKSIZE, mask=n_ok, other=0.0)
        acc += part * scale[:, None]
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


_JITTED: dict[bool, object] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


def kernel():
    mode = interpreting()
    if mode not in _JITTED:
        _JITTED[mode] = triton.jit(_lut_matmul)
    return _JITTED[mode]


def block_k_for(blocksize: int) -> int:
    for b in BLOCK_K_CHOICES:
        if blocksize % b == 0:
            return b
    raise ValueError(f"LUT4 blocksize {blocksize} is not a multiple of 16: the Triton kernel cannot step within "
                     f"one block")


class LutTritonWeight(PreparedWeight):
    """A LUT4Layout for the Triton kernel: the layout's own tensors, made contiguous."""

    backend = "triton"

    def __init__(self, layout: LUT4Layout, act_dtype: torch.dtype):
        super().__init__(layout, act_dtype)
        self.blocksize = layout.blocksize
        self.block_k = block_k_for(layout.blocksize)
        self.register_buffer("qweight", layout.qweight.contiguous(), persistent=False)
        self.register_buffer("absmax", layout.absmax.float().contiguous(), persistent=False)
        self.register_buffer("table", layout.table.float().contiguous(), persistent=False)
        self.layout = None  # the buffers are the layout

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x if x.stride(-1) == 1 else x.contiguous()
        M, N, K = x.shape[0], self.out_features, self.in_features
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        if M == 0:
            return y
        block_m = 16 if M <= 16 else 32 if M <= 32 else 64
        block_n = 32 if interpreting() else 64
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        kernel()[grid](x, self.qweight, self.absmax, self.table, y, M, N, K,
                       x.stride(0), self.qweight.stride(0), self.absmax.stride(0), y.stride(0),
                       BLOCKSIZE=self.blocksize, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=self.block_k,
                       DOT_F32=bool(interpreting() or x.dtype == torch.float32))
        return y

    def dequantize(self) -> torch.Tensor:
        return reference.dequantize(LUT4Layout(self.qweight, self.absmax, self.table, self.blocksize))

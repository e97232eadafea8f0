"""Codebook-quantized matmuls (AQLM, VPTQ): the float decode and the Triton-backed weight.

`dequantize_codebook` is the oracle and the CPU fallback (`DequantizedWeight` goes through
`kernels.reference`, which calls it). It decodes in a fixed order (codebooks summed 0..C-1, then
the out-group scale, then the columns permuted, then scale and bias), so that decoding a rank's
slice gives exactly the elements of the full decode.

`CodebookTritonWeight` keeps the codes and codebooks as they are and runs
`kernels.codebook_kernel` per part. A block's column permutation and normalization move onto x
(W[:, perm[j]] = Wint[:, j] * s + b means y = ((x * s)[:, perm]) @ Wint^T + (x @ b)), so the
kernel only ever decodes the internal columns. This module imports triton only when a Triton
weight is prepared.
"""

from __future__ import annotations

import importlib
import sys

import torch

from kernels.layouts import CodebookBlock, CodebookLayout, CodebookPart
from kernels.prepared import PreparedWeight


def dequantize_part(part: CodebookPart, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The part's internal weight [out_features, in_features]."""
    no, ki, c = part.codes.shape
    gk, _, _, og, ig = part.codebooks.shape
    books = part.codebooks.to(dtype)
    codes = part.codes.long()
    group = ((torch.arange(ki, device=codes.device) * ig + part.k_offset) // part.group_cols)[None, :]
    w = books[group, 0, codes[..., 0]]  # [No, Ki, og, ig]
    for i in range(1, c):
        w = w + books[group, i, codes[..., i]]
    if part.scales is not None:
        w = w * part.scales.to(dtype)[:, None, None, None]
    w = w.permute(0, 2, 1, 3).reshape(no * og, ki * ig)
    return w[part.out_skip: part.out_skip + part.out_features]


def dequantize_block(block: CodebookBlock, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    w = torch.cat([dequantize_part(p, dtype) for p in block.parts], dim=1)
    if block.perm is not None:
        permuted = torch.empty_like(w)
        permuted[:, block.perm] = w
        w = permuted
    if block.col_scale is not None:
        w = w * block.col_scale.to(dtype)
    if block.col_bias is not None:
        w = w + block.col_bias.to(dtype)
    return w


def dequantize_codebook(layout: CodebookLayout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight as [N, K] in `dtype`."""
    return torch.cat([dequantize_block(b, dtype) for b in layout.blocks], dim=0).contiguous()


def codebook_kernels():
    """The kernel module, (re)loaded if TRITON_INTERPRET changed since it was imported."""
    mod = sys.modules.get("kernels.codebook_kernel")
    if mod is None:
        mod = importlib.import_module("kernels.codebook_kernel")
    if mod.INTERPRET != mod.interpret_requested():
        mod = importlib.reload(mod)
    return mod


class _PreparedPart:
    """One part's buffers as the kernel reads them: contiguous, codebooks in float32 (the decoded
    tile is rounded once, to the activation dtype, for the dot; fp32 runs the dot in IEEE fp32)."""

    def __init__(self, part: CodebookPart, act_dtype: torch.dtype, col_start: int):
        self.codes = part.codes.contiguous()
        self.books = part.codebooks.float().contiguous()  # exact for fp16/bf16 codebooks; rounded once in the dot
        self.scales = None if part.scales is None else part.scales.float().contiguous()
        self.col_start, self.cols = col_start, part.in_features
        self.out_skip, self.group_cols, self.k_offset = part.out_skip, part.group_cols, part.k_offset
        self.num_codebooks, self.codebook_size = part.codes.shape[2], part.codebooks.shape[2]
        self.og, self.ig = part.codebooks.shape[3], part.codebooks.shape[4]
        self.num_in_groups = part.codes.shape[1]


class CodebookTritonWeight(PreparedWeight):
    backend = "triton"

    def __init__(self, layout: CodebookLayout, act_dtype: torch.dtype, block_m: int = 16, block_n: int = 32,
                 block_k: int = 32):
        super().__init__(layout, act_dtype)
        self.block_m, self.block_n, self.block_k = block_m, block_n, block_k
        self._blocks = []
        for b in layout.blocks:
            parts, start = [], 0
            for p in b.parts:
                prepared = _PreparedPart(p, act_dtype, start)
                parts.append(prepared)
                start += p.in_features
                # registered too, so that buffers() (memory reports, benchmarks) counts what the kernel reads
                n = sum(1 for _ in self.buffers())
                self.register_buffer(f"codes_{n}", prepared.codes, persistent=False)
                self.register_buffer(f"books_{n}", prepared.books, persistent=False)
            perm = None if b.perm is None else b.perm.long()
            scale = None if b.col_scale is None else b.col_scale.to(act_dtype)
            bias = None if b.col_bias is None else b.col_bias.float()
            self._blocks.append((b.out_features, parts, perm, scale, bias))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        kern = codebook_kernels()
        M = x.shape[0]
        outs = []
        for rows, parts, perm, scale, bias in self._blocks:
            xb = x if scale is None else x * scale
            xb = xb.index_select(1, perm) if perm is not None else xb
            y = torch.empty(M, rows, dtype=torch.float32, device=x.device)
            for n, p in enumerate(parts):
                xp = xb[:, p.col_start: p.col_start + p.cols].contiguous()
                grid = (triton_cdiv(rows, self.block_n), triton_cdiv(M, self.block_m))
                kern.codebook_matmul_kernel[grid](
                    xp, p.codes, p.books, p.scales if p.scales is not None else p.books, y,
                    M, rows, p.cols, xp.stride(0), y.stride(0), p.num_in_groups, p.codebook_size,
                    p.out_skip, p.group_cols, p.k_offset,
                    NUM_CODEBOOKS=p.num_codebooks, OG=p.og, IG=p.ig, HAS_SCALES=p.scales is not None,
                    ACCUMULATE=n > 0, IEEE=x.dtype == torch.float32,
                    BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k)
            if bias is not None:
                y += (x.float() @ bias)[:, None]
            outs.append(y)
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return y.to(x.dtype)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)

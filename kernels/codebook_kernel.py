"""Triton kernel: y (+)= x @ W^T for one `CodebookPart`, W decoded in registers from its codes.

Per BLOCK_K step each program gathers, for its BLOCK_N x BLOCK_K tile, every codebook's code
of the tile's (out-group, in-group) cells and the codebook entries they select, sums the
codebooks (the additive decode of AQLM / VPTQ's main + residual), and feeds the tile to the
dot. Codes are read og * ig times per tile from L1/L2, not from DRAM; the full weight never
exists in memory. Scales per out-group apply once to the accumulator.

Whether kernels are interpreted is fixed when this module is (re)loaded (TRITON_INTERPRET), as
for kernels.triton_kernels; `kernels.codebook_matmul` reloads it when the setting changed.
"""

import os

import triton
import triton.language as tl


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


INTERPRET = interpret_requested()


@triton.jit
def codebook_matmul_kernel(x_ptr, codes_ptr, books_ptr, scales_ptr, y_ptr,
                           M, N, K, stride_xm, stride_ym, num_in_groups, codebook_size,
                           out_skip, group_cols, k_offset,
                           NUM_CODEBOOKS: tl.constexpr, OG: tl.constexpr, IG: tl.constexpr,
                           HAS_SCALES: tl.constexpr, ACCUMULATE: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row = rn + out_skip
    o = (row // OG).to(tl.int64)
    i = row % OG
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        g = rk // IG
        j = rk % IG
        kg = ((rk + k_offset) // group_cols).to(tl.int64)
        w_ok = n_ok[:, None] & k_ok[None, :]
        cell = (o[:, None] * num_in_groups + g[None, :]) * NUM_CODEBOOKS
        w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for c in tl.static_range(NUM_CODEBOOKS):
            code = tl.load(codes_ptr + cell + c, mask=w_ok, other=0)
            entry = (kg[None, :] * NUM_CODEBOOKS + c) * codebook_size + code
            w += tl.load(books_ptr + entry * (OG * IG) + i[:, None] * IG + j[None, :], mask=w_ok,
                         other=0.0).to(tl.float32)
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm < M)[:, None] & k_ok[None, :],
                     other=0.0)
        if IEEE:
            acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
    if HAS_SCALES:
        acc *= tl.load(scales_ptr + o, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    y_ok = (rm < M)[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=y_ok, other=0.0)
    tl.store(y_ptrs, acc, mask=y_ok)

"""Triton kernel for LUT4Layout (bitsandbytes nf4 / fp4): y = x @ W^T, W decoded in registers.

One kernel, two paths (constexpr GEMV) over the same tile of codes. A program owns BLOCK_N rows of W
and BLOCK_M rows of x, and a range of K walked in BLOCK_K steps. A step's codes are loaded as
[BLOCK_N, NB, SUB / 2] bytes: NB sub-blocks of SUB codes, SUB the largest power of two dividing the
blocksize (at most BLOCK_K), so a sub-block lies in one absmax block while a step may span several
(one absmax load per row and sub-block). Each byte's high (even k) and low (odd k) nibble are joined
into a last axis of 2, so [BLOCK_N, NB, SUB / 2, 2] is K order. Codes become table values by a
four-level select tree over the code's bits (the 16 table entries are scalars held in registers: no
memory access; ptxas makes it ~17 instructions a code), or, DECODE_GATHER, by a load from the
64-byte table (one L1-resident line; ~9 instructions and one load a code). On an H200 (bf16,
Llama-2-7B shapes, 2026-12-03) the gather made the GEMV 1.8-2.1x faster (qkv at M = 1: 33 us against
61) and the dot tiles 4x slower (M = 16: 317 us against 74), so the default ("auto") gathers in the
GEMV and selects in the dot; `QSHARD_LUT_DECODE=select|gather` (read at prepare time) forces one.

- GEMV (M <= GEMV_MAX_M: no tensor cores): x's rows are taken one at a time (a static loop over
  BLOCK_M), each read as [NB, SUB / 2, 2], multiplied by the decoded tile, summed per sub-block,
  scaled by its absmax and added into y's column in float32. The decode is shared by all rows; x is
  tiny and stays in L1. Large steps (512 codes, 256 bytes a row) amortise the loop and reductions.
- dot (larger M): the decoded tile is scaled by its absmax element-wise, reshaped to
  [BLOCK_N, BLOCK_K] and multiplied by the x tile [BLOCK_K, BLOCK_M] in a tensor-core dot
  (16-bit operands for 16-bit activations, ieee float32 for float32), accumulated in float32.
- SPLIT_K > 1: the programs of one output tile split K, add their float32 partial sums into a
  zeroed workspace with atomics, and the last to arrive (a per-tile counter) converts the sum,
  writes y and zeroes the workspace and the counter again (kernels.triton_kernels' scheme): one
  launch, no memset, no host sync, safe to capture in a CUDA graph. The split is chosen from the
  shapes alone so that there are ~2 programs per SM.

Rows past N (and, in the GEMV, past M) re-read the last row, whose results are never stored, so
those loads need no mask; MASK_K masks the last step's sub-blocks past K (K is a multiple of the
blocksize, hence of SUB).

Whether the kernel is interpreted follows TRITON_INTERPRET when it is first launched in each mode
(the jitted function is made per mode: triton decides at decoration time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.errors import InputError
from kernels.layouts import LUT4Layout
from kernels.prepared import PreparedWeight
from kernels.triton_backend import split_workspace

# M up to this takes the GEMV path: its rows share the decode, but each adds a convert and an FMA per
# weight on the CUDA cores, which the dot path leaves to the tensor cores
GEMV_MAX_M = 4
MAX_SPLIT = 16
INTERPRETED_SMS = 2  # the interpreter has no SMs: a fixed small count keeps its grids small
DECODES = ("auto", "select", "gather")


def _lut_matmul(x_ptr, w_ptr, a_ptr, t_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K,
                stride_xm, stride_w, stride_a, stride_ym,
                BLOCKSIZE: tl.constexpr, SUB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GEMV: tl.constexpr, DECODE_GATHER: tl.constexpr,
                MASK_K: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    NB: tl.constexpr = BLOCK_K // SUB
    HB: tl.constexpr = SUB // 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows = tl.minimum(offs_n, N - 1)
    offs_j = tl.arange(0, NB)
    offs_b = tl.arange(0, HB)
    sub_k = offs_j * SUB  # where sub-block j starts, from the step's k0
    # byte b of sub-block j holds k = 2b (high nibble) and 2b + 1 (low nibble): [NB, HB, 2] in K order
    kk = sub_k[:, None, None] + 2 * offs_b[None, :, None] + tl.arange(0, 2)[None, None, :]
    w_base = w_ptr + rows[:, None, None] * stride_w + (offs_j * HB)[None, :, None] + offs_b[None, None, :]
    a_base = a_ptr + rows[:, None] * stride_a

    steps = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(steps, SPLIT_K)
    k_lo = pid_k * per_split * BLOCK_K
    k_hi = tl.minimum(k_lo + per_split * BLOCK_K, K)

    if not DECODE_GATHER:  # the table in registers: 16 scalars
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
    if GEMV:
        x_base = x_ptr + kk  # [NB, HB, 2], plus the row's offset
    else:
        offs_k = tl.arange(0, BLOCK_K)
        x_base = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]  # [BLOCK_K, BLOCK_M]

    for k0 in range(k_lo, k_hi, BLOCK_K):
        a_ptrs = a_base + ((k0 + sub_k) // BLOCKSIZE)[None, :]
        if MASK_K:
            sub_ok = (k0 + sub_k) < K
            packed = tl.load(w_base + k0 // 2, mask=sub_ok[None, :, None], other=0)
            scale = tl.load(a_ptrs, mask=sub_ok[None, :], other=0.0)
        else:
            packed = tl.load(w_base + k0 // 2)
            scale = tl.load(a_ptrs)
        packed = packed.to(tl.int32)
        if DECODE_GATHER:
            w = tl.join(tl.load(t_ptr + (packed >> 4)), tl.load(t_ptr + (packed & 15)))
        else:
            codes = tl.join(packed >> 4, packed & 15)  # [BLOCK_N, NB, HB, 2]
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
        if GEMV:
            # one x row at a time against the decoded tile: a 5-d [BLOCK_N, BLOCK_M, ...] product
            # makes triton move the whole tile through shared memory into another layout each step
            for m in tl.static_range(BLOCK_M):
                row = pid_m * BLOCK_M + m
                x_ptrs = x_base + (tl.minimum(row, M - 1) * stride_xm + k0)  # rows past M: as for N
                if MASK_K:
                    x = tl.load(x_ptrs, mask=(k0 + kk) < K, other=0.0)
                else:
                    x = tl.load(x_ptrs)
                # a sub-block's sum, then its absmax (one multiply per sub-block), then the step's
                part = tl.sum(tl.sum(tl.sum(w * x.to(tl.float32)[None, :, :, :], axis=3), axis=2) * scale, axis=1)
                acc += tl.where(offs_m[None, :] == row, part[:, None], 0.0)
        else:
            w = tl.reshape(w * scale[:, :, None, None], (BLOCK_N, BLOCK_K))
            x_mask = m_ok[None, :]
            if MASK_K:
                x_mask = x_mask & ((k0 + offs_k) < K)[:, None]
            x = tl.load(x_base + k0, mask=x_mask, other=0.0)
            if DOT_F32:
                acc += tl.dot(w, x.to(tl.float32), input_precision="ieee")  # not tf32: float32 means float32
            else:
                acc += tl.dot(w.to(x.dtype), x)

    y_offs = offs_m[None, :] * stride_ym + offs_n[:, None]
    y_mask = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tile = pid_n * tl.num_programs(0) + pid_m
        ws_offs = offs_m[None, :] * N + offs_n[:, None]
        tl.atomic_add(ws_ptr + ws_offs, acc, mask=y_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial is in before the tile's counter moves
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            tl.debug_barrier()
            # read the finished sum with an atomic (at L2, never a stale L1 line); every other split
            # has arrived, so plain stores can then leave zeros for the next call
            total = tl.atomic_add(ws_ptr + ws_offs, tl.zeros_like(acc), mask=y_mask, sem="relaxed")
            total = tl.where(y_mask, total, 0.0)  # masked lanes return garbage (the interpreter's overflows)
            tl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.store(ws_ptr + ws_offs, tl.zeros_like(acc), mask=y_mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


_JITTED: dict[bool, object] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


def kernel():
    mode = interpreting()
    if mode not in _JITTED:
        _JITTED[mode] = triton.jit(_lut_matmul)
    return _JITTED[mode]


@dataclass(frozen=True)
class LutConfig:
    """One launch's tiling. gemv: the no-dot path (block_m rows of x per program, any power of two)."""

    gemv: bool
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4

    def __post_init__(self):
        pow2 = all(v > 0 and v & (v - 1) == 0 for v in (self.block_m, self.block_n, self.block_k))
        if not pow2 or self.block_k < 16 or self.split_k < 1 or (not self.gemv and self.block_m < 16):
            raise InputError(f"{self}: blocks must be powers of two, block_k >= 16, split_k >= 1, and the dot "
                             f"path's block_m >= 16")


def sub_block(blocksize: int, block_k: int) -> int:
    """The codes per absmax load: the largest power of two dividing blocksize, at most block_k."""
    return min(blocksize & -blocksize, block_k)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def split_for(tiles: int, k_steps: int, sms: int) -> int:
    """Splits of K that bring the programs to ~2 per SM (fewer where K has fewer steps); then as
    few as cover the steps evenly, so no split is left without one."""
    split = max(1, min(-(-2 * sms // tiles), k_steps, MAX_SPLIT))
    return -(-k_steps // -(-k_steps // split))


@lru_cache(maxsize=4096)  # pure in its arguments; called per launch (a decode step makes hundreds)
def choose_config(M: int, N: int, K: int, sms: int | None) -> LutConfig:
    """GEMV for M <= GEMV_MAX_M (wide K steps: 256 bytes of codes per row), else the dot path; K split
    for ~2 programs per SM. sms=None: interpreted, small tiles (CPU time grows with them) that still
    take several steps and sub-blocks, and INTERPRETED_SMS."""
    interpreted = sms is None
    if M <= GEMV_MAX_M:
        block_m, block_n, block_k, warps = next_pow2(M), (8 if interpreted else 16), 512, 4
    else:
        block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
        block_n, block_k, warps = (32 if interpreted else 64), 128, 8 if block_m == 128 else 4
    if interpreted:
        block_k = 128
    block_k = max(16, min(block_k, next_pow2(K)))
    tiles = -(-M // block_m) * -(-N // block_n)
    split = split_for(tiles, -(-K // block_k), INTERPRETED_SMS if interpreted else sms)
    return LutConfig(M <= GEMV_MAX_M, block_m, block_n, block_k, split, warps)


@lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_mode() -> str:
    """How codes become table values: QSHARD_LUT_DECODE=auto (default: gather in the GEMV, select in
    the dot), select or gather (see the module doc)."""
    mode = os.environ.get("QSHARD_LUT_DECODE", "auto").strip().lower()
    if mode not in DECODES:
        raise InputError(f"QSHARD_LUT_DECODE={mode!r}: expected one of {DECODES}")
    return mode


class LutTritonWeight(PreparedWeight):
    """A LUT4Layout for the Triton kernel: the layout's own tensors, made contiguous."""

    backend = "triton"

    def __init__(self, layout: LUT4Layout, act_dtype: torch.dtype):
        super().__init__(layout, act_dtype)
        if layout.blocksize % 16:
            raise InputError(f"LUT4 blocksize {layout.blocksize} is not a multiple of 16: the Triton kernel "
                             f"reads absmax per sub-block of at least 16 codes")
        self.blocksize = layout.blocksize
        self.decode = decode_mode()
        self.register_buffer("qweight", layout.qweight.contiguous(), persistent=False)
        self.register_buffer("absmax", layout.absmax.float().contiguous(), persistent=False)
        self.register_buffer("table", layout.table.float().contiguous(), persistent=False)
        self.layout = None  # the buffers are the layout

    def config_for(self, M: int, device: torch.device) -> LutConfig:
        """The launch for M rows, from shapes alone: no host sync, CUDA-graph safe."""
        sms = None if interpreting() or device.type != "cuda" else sm_count(device)
        return choose_config(M, self.out_features, self.in_features, sms)

    def matmul(self, x: torch.Tensor, config: LutConfig | None = None) -> torch.Tensor:
        x = x if x.stride(-1) == 1 else x.contiguous()
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        if x.shape[0]:
            self.launch(x, y, config or self.config_for(x.shape[0], x.device))
        return y

    def launch(self, x: torch.Tensor, y: torch.Tensor, cfg: LutConfig) -> None:
        """y = x @ W^T into y [M, N] (unit column stride, any row stride): every element is written."""
        M, N, K = x.shape[0], self.out_features, self.in_features
        tiles_m, tiles_n = -(-M // cfg.block_m), -(-N // cfg.block_n)
        ws, locks = split_workspace(x.device, M * N, tiles_m * tiles_n) if cfg.split_k > 1 else (y, y)
        interpreted = interpreting()
        kernel()[(tiles_m, tiles_n, cfg.split_k)](
            x, self.qweight, self.absmax, self.table, y, ws, locks, M, N, K,
            x.stride(0), self.qweight.stride(0), self.absmax.stride(0), y.stride(0),
            BLOCKSIZE=self.blocksize, SUB=sub_block(self.blocksize, cfg.block_k), BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, GEMV=cfg.gemv,
            DECODE_GATHER=self.decode == "gather" or (self.decode == "auto" and cfg.gemv), MASK_K=K % cfg.block_k != 0,
            DOT_F32=bool(interpreted or x.dtype == torch.float32), num_warps=cfg.num_warps)

    def dequantize(self) -> torch.Tensor:
        return reference.dequantize(LUT4Layout(self.qweight, self.absmax, self.table, self.blocksize))

"""CPU backend on Intel AMX for GPTQ (2/3/4/8-bit), AWQ and per-channel int8, bf16 activations.

torch's packed CPU ops (`cpu-int4`, `cpu-int8`) unpack the weight again for every few rows of x
and multiply with vector FMAs, so their cost grows linearly with M (at K = N = 2048 they lose to
a dense bf16 matmul from M = 8). kernels/cpu_amx.c keeps the codes in AMX's int8 tile layout and
multiplies them two ways: up to 16 rows of x, as uint8 on int8 tiles against two int8 digit
planes of x (within 2^-16 of each row's largest value; 8-bit codes go from memory straight into
the tiles); for more rows, ORed into bf16 128.0 (128 + q) on bf16 tiles against x itself. Group
scales and zero points come out in fp32 per block. It needs AMX-INT8, AMX-BF16, AVX512-BF16 and
AVX512-VBMI (Sapphire Rapids and later) and a C compiler, found at first use.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading

import torch

from kernels import native_build
from kernels.codes import int_codes
from kernels.groups import aligned_block
from kernels.layouts import AWQLayout, GPTQLayout, Int8Layout
from kernels.prepared import PreparedWeight

FLAGS = ("-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vbmi", "-mamx-tile",
         "-mamx-int8", "-mamx-bf16")
CPU_FLAGS = ("amx_tile", "amx_int8", "amx_bf16", "avx512bw", "avx512_bf16", "avx512vbmi")
CHUNK_N = 256  # output columns repacked at a time (bounds load-time memory)


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return None, "no /proc/cpuinfo (not Linux)"
    missing = [f for f in CPU_FLAGS if f not in flags]
    if missing:
        return None, f"CPU lacks {', '.join(missing)}"
    lib, why = native_build.load("cpu_amx.c", FLAGS)
    if lib is None:
        return None, why
    if not lib.qs_amx_init():
        return None, "Linux refused AMX tile state (arch_prctl)"
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qs_amx_linear.restype = None
    lib.qs_amx_linear.argtypes = [ptr, i64, i64, ptr, i64, i32, ptr, ptr, i64, i64, ptr, ptr, i32]
    lib.qs_amx_scratch_bytes.restype = i64
    lib.qs_amx_scratch_bytes.argtypes = [i64, i64, i64, i64, i32]
    return lib, None


def available() -> str | None:
    """None when the AMX kernel runs on this machine, else why not (QSHARD_NO_AMX=1 turns it off,
    e.g. to compare with torch's ops in the same benchmark)."""
    if os.environ.get("QSHARD_NO_AMX", "0") not in ("", "0"):
        return "QSHARD_NO_AMX is set"
    return _library()[1]


def _block(layout, group_ids: torch.Tensor) -> int | None:
    if isinstance(layout, Int8Layout):
        return layout.in_features if layout.in_features % 32 == 0 else None
    # the largest block that stays within one group: fewer blocks, fewer int32 -> fp32 folds
    K = layout.in_features
    return aligned_block(group_ids, (K, 256, 128, 64, 32) if K % 32 == 0 else (256, 128, 64, 32))


def unsupported_reason(layout, act_dtype: torch.dtype) -> str | None:
    if act_dtype != torch.bfloat16:
        return f"the AMX kernel takes bfloat16 activations, not {act_dtype}"
    if not isinstance(layout, (GPTQLayout, AWQLayout, Int8Layout)):
        return f"{type(layout).__name__} is not GPTQ/AWQ/int8"
    if layout.scales.device.type != "cpu":
        return "weights are not on the CPU"
    if layout.out_features % 16 or layout.in_features % 32:
        return f"K={layout.in_features} is not a multiple of 32 or N={layout.out_features} of 16"
    if isinstance(layout, GPTQLayout) and layout.bits not in (2, 3, 4, 8):
        return f"{layout.bits}-bit codes"
    if not isinstance(layout, Int8Layout) and _block(layout, int_codes(layout).group_ids) is None:
        return "no run of 32/64/128/256 sorted rows stays within one group"
    return available()


def chunk_rows(block: int) -> int:
    """K rows per AMX tile product: 64 (an int8 tile row holds 64 bytes), 32 for 32-row blocks."""
    return 64 if block % 64 == 0 else 32


def pack_codes(codes: torch.Tensor, bits: int, kc: int) -> torch.Tensor:
    """Codes [K, n] (n % 16 == 0) → the kernel's bytes, panel by panel, chunks of kc rows (see cpu_amx.c)."""
    K, n = codes.shape
    c = codes.to(torch.uint8)
    if bits == 4:  # [chunk, half, i, p, panel, col] -> [panel, chunk, i, col, p] with the halves as nibbles
        c = c.view(K // kc, 2, kc // 8, 4, n // 16, 16).permute(4, 0, 2, 5, 3, 1)
        c = c[..., 0] | (c[..., 1] << 4)
    else:  # [chunk, i, p, panel, col] -> [panel, chunk, i, col, p]
        c = c.view(K // kc, kc // 4, 4, n // 16, 16).permute(3, 0, 1, 4, 2)
    return c.contiguous().view(-1)


class CpuAmxWeight(PreparedWeight):
    backend = "cpu-amx"

    def __init__(self, layout, act_dtype: torch.dtype):
        super().__init__(layout, act_dtype)
        reason = unsupported_reason(layout, act_dtype)
        if reason:
            raise ValueError(f"cpu-amx backend: {reason}")
        K, N = layout.in_features, layout.out_features
        src = int_codes(layout)
        self.bits = 8 if src.bits == 8 else 4  # 2- and 3-bit codes are 4-bit codes
        self.block = _block(layout, src.group_ids)
        self.chunk_rows = chunk_rows(self.block)
        block_groups = src.group_ids[:: self.block]
        s = src.scales[block_groups]  # [K / block, N]
        s_zero = s * src.zeros[block_groups]

        def by_panel(t: torch.Tensor) -> torch.Tensor:  # [blocks, N] -> [N / 16, blocks, 16]
            return t.reshape(-1, N // 16, 16).permute(1, 0, 2).contiguous()

        packed = [pack_codes(src.codes_of(n0, min(N, n0 + CHUNK_N)), self.bits, self.chunk_rows)
                  for n0 in range(0, N, CHUNK_N)]
        self.register_buffer("packed", torch.cat(packed) if len(packed) > 1 else packed[0], persistent=False)
        self.register_buffer("scale", by_panel(s), persistent=False)
        self.register_buffer("scale_zero", by_panel(s_zero), persistent=False)
        self.register_buffer("perm", src.perm, persistent=False)
        # per-call constants as plain values (buffer lookups and pointer reads cost microseconds a call);
        # the tuple holds the tensors too, so the pointers stay valid whatever happens to the buffers
        self._call = ((self.packed, self.scale, self.scale_zero),
                      (self.packed.data_ptr(), N, self.bits, self.scale.data_ptr(), self.scale_zero.data_ptr(),
                       self.block, self.chunk_rows), src.perm)
        self._scratch_bytes: dict[tuple[int, int], int] = {}  # by (M, threads)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        _, weight_args, perm = self._call
        if perm is not None:
            x = x.index_select(-1, perm)
        x = x.contiguous()
        M, K = x.shape
        out = torch.empty(M, self.out_features, dtype=torch.bfloat16)
        if M == 0:
            return out
        lib = _library()[0]
        threads = torch.get_num_threads()
        nbytes = self._scratch_bytes.get((M, threads))
        if nbytes is None:
            nbytes = self._scratch_bytes[M, threads] = lib.qs_amx_scratch_bytes(M, K, self.block, self.chunk_rows, threads)
        lib.qs_amx_linear(x.data_ptr(), M, K, *weight_args, _scratch(nbytes), out.data_ptr(), threads)
        return out


_thread_scratch = threading.local()


def _scratch(nbytes: int) -> int:
    """Address of this thread's scratch for the kernel (activation planes, block sums), grown as needed.

    Allocated by torch, so that running out of memory raises here rather than crashing in C; kept
    between calls, as a decode step makes hundreds of them.
    """
    buf = getattr(_thread_scratch, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _thread_scratch.buf = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)
    return buf.data_ptr()

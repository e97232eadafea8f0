"""Triton kernel: y = x @ W^T with W dequantized in registers from its packed form.

One kernel, specialised by constexprs, serves every layout:
- WEIGHT: how codes are stored. KPACK: b-bit codes packed along K, 32 // b per int32 word (GPTQ
  2/4/8-bit). Each word is loaded once, then either unpacked in registers into the block's codes
  in K order (SLICES = 1: halves split and interleaved, 32 → 16 → 8 → 4 bits), or peeled off one
  code per word at a time (SLICES = 32 // b: slice j holds rows k0 + i*SLICES + j, and x is read
  with the matching stride; the dot sums over K in any order). KPACK_STREAM: the same layout read
  as a bit stream row by row, for widths whose codes straddle words (3-bit).
  NPACK_AWQ: 4-bit codes packed along N in AWQ order. DENSE: int8 or float8 [N, K].
- SCALES: CHANNEL ([N], after the K loop), TENSOR (0-d, after the loop), GROUP (rows of one
  BLOCK_K block share a group: the block's partial sum is scaled once) or ROW (group per row,
  from g_idx or k // GROUP_SIZE, scaled element by element: unequal or small groups).
- ZEROS: NONE (signed codes), CONST (symmetric 2**(b-1)), TABLE (uint8 [G, N], unpacked at load).
- USE_DOT: tensor-core tile (acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T: the dequantized weight is
  the left operand so it can stay in registers on Hopper) or, for M = 1, a GEMV that accumulates
  acc[BLOCK_N, SLICE_K] with FMAs and reduces once at the end.
- SPLIT_K > 1: programs on one output tile split K, add fp32 partials into a zeroed workspace with
  atomics, and the last to arrive (a per-tile counter) converts the sum, writes y and zeroes the
  workspace and counter again: one launch, no memset, safe to capture in a CUDA graph.

Integer codes become floats without int-to-float conversions (a quarter-rate instruction on NVIDIA
GPUs): OR-ing a code < 2**23 into the mantissa of 2**23 gives the float 2**23 + code exactly, and
subtracting 2**23 + zero_point leaves (code - zero_point), exactly. The GEMV with 16-bit
activations and block-wide scales (LOW_MAGIC) saves that subtraction per element: it ORs the code
into 256's mantissa (256 + code, exact for 8-bit codes), accumulates (256 + code) * x, and takes
(256 + zero) * sum(x) off once per block; the cancellation costs ~9 of fp32's 24 bits, far below
bf16/fp16 output rounding. EVEN (every block full in N and K) drops the bounds masks.

MAGIC_ASM (compiled CUDA, 4-bit K-packed codes peeled code by code into 16-bit dot tiles): one
`lop3` turns two codes of a word (nibbles j and j + 4, 16 bits apart after one shift) into a pair of
16-bit floats M + code (fp16 M = 1024, bf16 M = 128: exact), and one packed `fma` takes M + zero
off both: 1.5 instructions per code where shift, mask, magic-or, float subtraction and a float32 →
16-bit conversion took ~4 (the 4-bit unpack, not DRAM, bounded the dot path). Triton reaches
neither instruction through its own ops; the interpreter computes the same values with integer
arithmetic (EMULATE_ASM), so the slice order is tested on CPU too. JOINED puts the eight slices back in K order (joins and a reshape in registers) for one
dot over the block and one contiguous x tile, instead of eight 16-deep dots over strided x rows.

Whether kernels are interpreted is fixed when this module is (re)loaded (TRITON_INTERPRET);
`kernels.triton_backend` reloads it when that setting has changed.
"""

import os

import triton
import triton.language as tl


def interpret_requested() -> bool:
    """TRITON_INTERPRET as triton reads it when a kernel is decorated."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


INTERPRET = interpret_requested()
EMULATE_ASM = tl.constexpr(INTERPRET)  # inline PTX cannot run in the interpreter: emulate it

# kernel-side constants must be constexpr globals; the launcher passes their `.value`
KPACK, KPACK_STREAM, NPACK_AWQ, DENSE = (tl.constexpr(i) for i in range(4))
SCALE_CHANNEL, SCALE_TENSOR, SCALE_GROUP, SCALE_ROW = (tl.constexpr(i) for i in range(4))
ZERO_NONE, ZERO_CONST, ZERO_TABLE = (tl.constexpr(i) for i in range(3))

MAGIC = tl.constexpr(8388608.0)  # 2**23
MAGIC_BITS = tl.constexpr(0x4B000000)  # bit pattern of the float 2**23
LOW_MAGIC_VALUE = tl.constexpr(256.0)  # the GEMV's: 256.0 has weight 1 at mantissa bit 15, so code << 15 adds code
LOW_MAGIC_BITS = tl.constexpr(0x43800000)  # bit pattern of the float 256


@triton.jit
def _magic_float(codes):
    """int32 codes in [0, 2**23) → float32 2**23 + code."""
    return (codes | MAGIC_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _split_fields(codes, HALF: tl.constexpr):
    """Each field of 2*HALF bits → its two HALF-bit halves, low half first, side by side along K."""
    mask = (1 << HALF) - 1
    return tl.interleave(codes & mask, (codes >> HALF) & mask)


@triton.jit
def _unpack_words(words, BITS: tl.constexpr):
    """[BLOCK_N, W] words → [BLOCK_N, W * 32 // BITS] codes in stream order (column c: code c)."""
    codes = _split_fields(words, 16)
    if BITS <= 8:
        codes = _split_fields(codes, 8)
    if BITS <= 4:
        codes = _split_fields(codes, 4)
    if BITS <= 2:
        codes = _split_fields(codes, 2)
    return codes


@triton.jit
def _stream_codes(w_ptr, ks, offs_n, k_ok, n_ok, stride_w, BITS: tl.constexpr):
    """[BLOCK_N, len(ks)] codes of rows ks from a bit stream along K (any width, words may straddle)."""
    bit = ks * BITS
    word = bit >> 5
    shift = (bit & 31).to(tl.uint32)
    mask = n_ok[:, None] & k_ok[None, :]
    ptrs = w_ptr + word[None, :] * stride_w + offs_n[:, None]
    codes = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True) >> shift[None, :]
    if 32 % BITS != 0:
        # the high bits of a straddling code start the next word; elsewhere the masked load gives 0
        spill = (bit & 31) + BITS > 32
        nxt = tl.load(ptrs + stride_w, mask=mask & spill[None, :], other=0).to(tl.uint32, bitcast=True)
        codes = codes | (nxt << ((32 - shift) & 31)[None, :])
    return (codes & ((1 << BITS) - 1)).to(tl.int32, bitcast=True)


@triton.jit
def _awq_codes(w_ptr, ks, offs_n, k_ok, n_ok, stride_w):
    """[BLOCK_N, len(ks)] 4-bit codes packed along N; column c of a word sits in slot (c//2) + 4*(c%2)."""
    c = offs_n % 8
    shift = ((c // 2) + (c % 2) * 4) * 4
    ptrs = w_ptr + ks[None, :] * stride_w + (offs_n // 8)[:, None]
    words = tl.load(ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
    return (words >> shift[:, None]) & 0xF


@triton.jit
def _load(ptrs, mask, other, MASKED: tl.constexpr):
    """A load that drops its bounds mask when every block is known to be full (EVEN shapes)."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=other)
    return tl.load(ptrs)


def _pair_asm(magic_pair: str, one_pair: str, fma: str) -> tl.constexpr:
    """PTX for `_nibble_pair`: lop3 (LUT 0xEA = (a & b) | c) ORs the nibbles at bits 0-3 and 16-19 into
    the magic's two halves; the packed fma (x 1 + $3) takes M + zero off both; the halves go out apart."""
    return tl.constexpr("{\n.reg .b32 t, one;\n"
                        f"lop3.b32 t, $2, 0x000F000F, {magic_pair}, 0xEA;\n"
                        f"mov.b32 one, {one_pair};\n"
                        f"{fma} t, t, one, $3;\n"
                        "mov.b32 {$0, $1}, t;\n}")


_PAIR_ASM_F16 = _pair_asm("0x64006400", "0x3C003C00", "fma.rn.f16x2")  # M = 1024
_PAIR_ASM_BF16 = _pair_asm("0x43004300", "0x3F803F80", "fma.rn.bf16x2")  # M = 128


@triton.jit
def _nibble_pair(words, z, DTYPE: tl.constexpr):
    """(code_j - z, code_{j+4} - z) as 16-bit floats from words already shifted right by 4 j
    (nibbles j and j + 4 now at bits 0-3 and 16-19). z: int32 zero points, broadcastable to words.
    Interpreted (no PTX there), the same values come from plain integer arithmetic."""
    if EMULATE_ASM:
        lo = ((words & 0xF) - z).to(tl.float32).to(DTYPE)  # via float32: the interpreter's int → bf16 gives NaN
        hi = (((words >> 16) & 0xF) - z).to(tl.float32).to(DTYPE)
        return lo, hi
    neg_zero = tl.broadcast_to(_neg_magic_zero(z, DTYPE), words.shape)
    if DTYPE == tl.float16:
        return tl.inline_asm_elementwise(_PAIR_ASM_F16, "=h,=h,r,r", [words, neg_zero],
                                         dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(_PAIR_ASM_BF16, "=h,=h,r,r", [words, neg_zero],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a @ b: 16-bit tensor cores, or exact float32 (float32 activations; the interpreter, whose
    bf16 dot is not trustworthy)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _neg_magic_zero(z, DTYPE: tl.constexpr):
    """int32 zero points (< 16) → the packed pair -(M + z), -(M + z) that `_nibble_pair` adds."""
    if DTYPE == tl.float16:
        h = z | 0xE400  # fp16 bits of -(1024 + z)
    else:
        h = z | 0xC300  # bf16 bits of -(128 + z)
    return h | (h << 16)


@triton.jit
def _x_columns(ks, p_ptr, k_ok, PERM: tl.constexpr, MASKED: tl.constexpr):
    """The columns of x that weight rows ks multiply: ks, or perm[ks] where act-order rows were sorted."""
    if PERM:
        return _load(p_ptr + ks, k_ok, 0, MASKED)
    return ks


@triton.jit
def quant_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, p_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, first_group,
    stride_xm, stride_ym, stride_w, stride_s, stride_z,
    WEIGHT: tl.constexpr, BITS: tl.constexpr, SLICES: tl.constexpr,
    SCALES: tl.constexpr, ZEROS: tl.constexpr, ZERO_POINT: tl.constexpr, GROUP_SIZE: tl.constexpr,
    FLOAT_CODES: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr,
    EVEN: tl.constexpr, LOW_MAGIC: tl.constexpr, MAGIC_ASM: tl.constexpr, JOINED: tl.constexpr, PERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    SLICE_K: tl.constexpr = BLOCK_K // SLICES
    PER_WORD: tl.constexpr = 32 // BITS
    MASKED: tl.constexpr = not EVEN
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = tile % num_m  # M varies fastest: programs sharing a weight tile run side by side (L2 reuse)
    pid_n = tile // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N

    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)

    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, SLICE_K), dtype=tl.float32)
    if ZEROS == ZERO_CONST:
        zero_off = MAGIC + ZERO_POINT
        low_zero = LOW_MAGIC_VALUE + ZERO_POINT
        if MAGIC_ASM:
            zero_int = tl.full((BLOCK_N, 1), 1 << (BITS - 1), tl.int32)

    for k0 in range(k_lo, k_hi, BLOCK_K):
        if USE_DOT:
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            part = tl.zeros((BLOCK_N, SLICE_K), dtype=tl.float32)
            if LOW_MAGIC:
                x_sum = tl.zeros((SLICE_K,), dtype=tl.float32)
        if SCALES == SCALE_GROUP:
            group = first_group + k0 // GROUP_SIZE
            if ZEROS == ZERO_TABLE:
                z = _load(z_ptr + group * stride_z + offs_n, n_ok, 0, MASKED).to(tl.int32)
                zero_off = _magic_float(z)[:, None]
                low_zero = (z.to(tl.float32) + LOW_MAGIC_VALUE)[:, None]
                if MAGIC_ASM:
                    zero_int = z[:, None]
        if WEIGHT == KPACK:
            rows = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
            words = _load(w_ptr + rows[None, :] * stride_w + offs_n[:, None],
                          n_ok[:, None] & (rows < tl.cdiv(K, PER_WORD))[None, :], 0, MASKED)
        if MAGIC_ASM and JOINED:  # the 8 slices joined back into K order: one dot over the whole block
            lo0, hi0 = _nibble_pair(words, zero_int, x_ptr.dtype.element_ty)
            lo1, hi1 = _nibble_pair(words >> 4, zero_int, x_ptr.dtype.element_ty)
            lo2, hi2 = _nibble_pair(words >> 8, zero_int, x_ptr.dtype.element_ty)
            lo3, hi3 = _nibble_pair(words >> 12, zero_int, x_ptr.dtype.element_ty)
            # each join adds a trailing axis; the last join is the fastest: code j = 4 b2 + 2 b1 + b0
            # sits at [b0][b1][b2] → flat (b2 b1 b0), i.e. row k0 + 8 w + j
            w = tl.reshape(tl.join(tl.join(tl.join(lo0, hi0), tl.join(lo2, hi2)),
                                   tl.join(tl.join(lo1, hi1), tl.join(lo3, hi3))), (BLOCK_N, BLOCK_K))
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            xt_ptrs = x_ptr + offs_m[None, :] * stride_xm + _x_columns(ks, p_ptr, k_ok, PERM, MASKED)[:, None]
            if EVEN:
                xt = tl.load(xt_ptrs, mask=m_ok[None, :], other=0.0)
            else:
                xt = tl.load(xt_ptrs, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
            part = _dot(w, xt, part, DOT_F32)
        elif MAGIC_ASM:  # 4-bit words, 8 slices: slices j and j + 4 from one lop3 (see module doc)
            for j in tl.static_range(4):
                lo, hi = _nibble_pair(words >> (4 * j), zero_int, x_ptr.dtype.element_ty)
                ks = k0 + tl.arange(0, SLICE_K) * 8 + j
                lo_ok, hi_ok = ks < K, ks + 4 < K
                x_rows = x_ptr + offs_m[None, :] * stride_xm
                lo_ptrs = x_rows + _x_columns(ks, p_ptr, lo_ok, PERM, MASKED)[:, None]
                hi_ptrs = x_rows + _x_columns(ks + 4, p_ptr, hi_ok, PERM, MASKED)[:, None]
                if EVEN:
                    x_lo = tl.load(lo_ptrs, mask=m_ok[None, :], other=0.0)
                    x_hi = tl.load(hi_ptrs, mask=m_ok[None, :], other=0.0)
                else:
                    x_lo = tl.load(lo_ptrs, mask=lo_ok[:, None] & m_ok[None, :], other=0.0)
                    x_hi = tl.load(hi_ptrs, mask=hi_ok[:, None] & m_ok[None, :], other=0.0)
                part = _dot(lo, x_lo, part, DOT_F32)
                part = _dot(hi, x_hi, part, DOT_F32)
        for j in tl.static_range(0 if MAGIC_ASM else SLICES):
            ks = k0 + tl.arange(0, SLICE_K) * SLICES + j
            k_ok = ks < K
            # ---- the weight slice, [BLOCK_N, SLICE_K] float32 ----
            if WEIGHT == DENSE:
                ptrs = w_ptr + offs_n[:, None] * stride_w + ks[None, :]
                dmask = n_ok[:, None] & k_ok[None, :]
                if FLOAT_CODES:
                    w = _load(ptrs, dmask, 0.0, MASKED).to(tl.float32)
                else:  # int8: shift to [0, 256) for the exact float trick
                    w = _magic_float(_load(ptrs, dmask, 0, MASKED).to(tl.int32) + 128) - (MAGIC + 128)
            else:
                if WEIGHT == KPACK:
                    if SLICES == 1:
                        codes = _unpack_words(words, BITS)
                    elif LOW_MAGIC:  # code j of each word straight into mantissa bits 15.. (one shift)
                        if j * BITS <= 15:
                            codes = (words << (15 - j * BITS)) & (CODE_MASK << 15)
                        else:
                            codes = (words >> (j * BITS - 15)) & (CODE_MASK << 15)
                    else:
                        codes = (words >> (j * BITS)) & CODE_MASK
                elif WEIGHT == KPACK_STREAM:
                    codes = _stream_codes(w_ptr, ks, offs_n, k_ok, n_ok, stride_w, BITS)
                else:
                    codes = _awq_codes(w_ptr, ks, offs_n, k_ok, n_ok, stride_w)
                if LOW_MAGIC:
                    if WEIGHT != KPACK or SLICES == 1:
                        codes = codes << 15
                    # 256 + code; 256 + zero comes off once per block, against the sum of x
                    w = (codes | LOW_MAGIC_BITS).to(tl.float32, bitcast=True)
                elif SCALES == SCALE_ROW:
                    if GROUP_SIZE > 0:
                        rg = first_group + ks // GROUP_SIZE
                    else:
                        rg = _load(g_ptr + ks, k_ok, 0, MASKED)
                    rmask = n_ok[:, None] & k_ok[None, :]
                    if ZEROS == ZERO_TABLE:
                        zr = _load(z_ptr + rg[None, :] * stride_z + offs_n[:, None], rmask, 0, MASKED)
                        zero_off = _magic_float(zr.to(tl.int32))
                    sr = _load(s_ptr + rg[None, :] * stride_s + offs_n[:, None], rmask, 0.0, MASKED)
                    w = (_magic_float(codes) - zero_off) * sr.to(tl.float32)
                else:
                    w = _magic_float(codes) - zero_off
            # ---- the activation slice, rows ks ----
            xk = _x_columns(ks, p_ptr, k_ok, PERM, MASKED)
            if USE_DOT:
                xt_ptrs = x_ptr + offs_m[None, :] * stride_xm + xk[:, None]
                if EVEN:
                    xt = tl.load(xt_ptrs, mask=m_ok[None, :], other=0.0)
                else:
                    xt = tl.load(xt_ptrs, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
                if DOT_F32:
                    part = tl.dot(w, xt.to(tl.float32), part, input_precision="ieee")
                else:
                    part = tl.dot(w.to(x_ptr.dtype.element_ty), xt, part)
            else:
                xv = _load(x_ptr + pid_m * stride_xm + xk, k_ok, 0.0, MASKED).to(tl.float32)
                part += w * xv[None, :]
                if LOW_MAGIC:
                    x_sum += xv
        if LOW_MAGIC:
            part -= low_zero * x_sum[None, :]
        if SCALES == SCALE_GROUP:
            s = _load(s_ptr + group * stride_s + offs_n, n_ok, 0.0, MASKED)
            part = part * s.to(tl.float32)[:, None]
        acc += part

    if USE_DOT:
        out = acc
    else:
        out = tl.sum(acc, axis=1)[:, None]
    if SCALES == SCALE_CHANNEL:
        out = out * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if SCALES == SCALE_TENSOR:
        out = out * tl.load(s_ptr).to(tl.float32)

    y_offs = offs_m[None, :] * stride_ym + offs_n[:, None]
    y_mask = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        ws_offs = offs_m[None, :] * N + offs_n[:, None]
        tl.atomic_add(ws_ptr + ws_offs, out, mask=y_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial is in before the tile's counter moves
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            tl.debug_barrier()
            # read the finished sum with an atomic (at L2, never a stale L1 line); every other
            # split has arrived, so plain stores can then leave zeros for the next call
            total = tl.atomic_add(ws_ptr + ws_offs, tl.zeros_like(out), mask=y_mask, sem="relaxed")
            tl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.store(ws_ptr + ws_offs, tl.zeros_like(out), mask=y_mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


@triton.jit
def dequantize_kernel(
    w_ptr, s_ptr, z_ptr, g_ptr, p_ptr, out_ptr,
    N, K, first_group, stride_w, stride_s, stride_z, stride_out,
    BITS: tl.constexpr, ZEROS: tl.constexpr, GROUP_SIZE: tl.constexpr, PERM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """K-packed codes → the dense weight out[n, k] = (code - zero) * scale in out's dtype, for a
    cuBLAS matmul at large M (prefill), where one dequantization serves many rows. Act-order rows
    (sorted at load) go back to their own columns through the permutation: x needs no gather."""
    PER_WORD: tl.constexpr = 32 // BITS
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = pid_k * (BLOCK_K // PER_WORD) + tl.arange(0, BLOCK_K // PER_WORD)
    n_ok = offs_n < N
    k_ok = ks < K
    words = tl.load(w_ptr + rows[None, :] * stride_w + offs_n[:, None],
                    mask=n_ok[:, None] & (rows < tl.cdiv(K, PER_WORD))[None, :], other=0)
    codes = _unpack_words(words, BITS)  # [BLOCK_N, BLOCK_K], column c: row ks[c]
    if GROUP_SIZE > 0:
        groups = first_group + ks // GROUP_SIZE
    else:
        groups = tl.load(g_ptr + ks, mask=k_ok, other=0)
    mask = n_ok[:, None] & k_ok[None, :]
    scales = tl.load(s_ptr + groups[None, :] * stride_s + offs_n[:, None], mask=mask, other=0.0).to(tl.float32)
    if ZEROS == ZERO_TABLE:
        zeros = tl.load(z_ptr + groups[None, :] * stride_z + offs_n[:, None], mask=mask, other=0).to(tl.float32)
    else:
        zeros = (1 << (BITS - 1)) * 1.0
    w = (codes.to(tl.float32) - zeros) * scales
    cols = _x_columns(ks, p_ptr, k_ok, PERM, True)
    tl.store(out_ptr + offs_n[:, None] * stride_out + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)

"""The canonical weight layouts the kernels read. Quant loaders convert checkpoints into these.

Dequantization, for each layout (k: input feature, n: output feature):
- GPTQLayout:  w[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n],  g(k) = g_idx[k] or k // group_size,
               z = the true zero point (GPTQ v2 semantics; v1's stored z - 1 is fixed at load),
               z = 2**(bits-1) everywhere when qzeros is None (symmetric).
- AWQLayout:   the same formula; qweight [K, N] is packed along N in AWQ_ORDER, no g_idx.
- Int8Layout:  w[n, k] = q[n, k] * s[n]         (int8 codes, per-output-channel scales)
- FP8Layout:   w[n, k] = float(q[n, k]) * s[n]  (float8_e4m3fn, per-tensor (s is 0-d) or per-channel)
- LUT4Layout:  w[n, k] = table[c[n, k]] * absmax[n, k // blocksize]  (4-bit lookup-table codes: bnb nf4/fp4)
- CodebookLayout: blocks along N (each its own codebooks); a block is parts along its internal
               columns, each w[n, k] = scale[o] * sum_c codebooks[kg, c, codes[o, k // ig, c], r % og, k % ig]
               (r = n + out_skip, o = r // og, kg = (k + k_offset) // group_cols), then the block's
               columns are permuted and normalized: W[:, perm[j]] = Wint[:, j] * s[perm[j]] + b[perm[j]]
               (AQLM: one part, no perm; VPTQ: outlier and main parts, og = vector length, ig = 1).
Int8Layout / FP8Layout with `dynamic_act` are W8A8: activations are quantized per token to the
weight's type at run time (kernels.act_quant); the weight formula is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.packing import packed_size


@dataclass
class GPTQLayout:
    qweight: torch.Tensor  # int32 [packed_size(K, bits), N], codes packed along K (no in-word order)
    scales: torch.Tensor  # float [G, N]
    qzeros: torch.Tensor | None  # int32 [G, packed_size(N, bits)] true zero points; None: symmetric
    g_idx: torch.Tensor | None  # int32 [K], group of each input row; None: k // group_size
    bits: int  # 2, 3, 4 or 8
    group_size: int  # rows per group when g_idx is None (K for a single group)
    in_features: int  # K, logical (qweight may be zero-padded past it)
    out_features: int  # N, logical

    def __post_init__(self):
        _check_packed("qweight", self.qweight, (packed_size(self.in_features, self.bits), self.out_features))
        G = self.scales.shape[0]
        _check_shape("scales", self.scales, (G, self.out_features))
        if self.qzeros is not None:
            _check_packed("qzeros", self.qzeros, (G, packed_size(self.out_features, self.bits)))
        if self.g_idx is not None:
            _check_shape("g_idx", self.g_idx, (self.in_features,))
        elif G != -(-self.in_features // self.group_size):
            raise ValueError(f"scales has {G} groups but K={self.in_features} with group_size={self.group_size} "
                             f"needs {-(-self.in_features // self.group_size)}")

    @property
    def num_groups(self) -> int:
        return self.scales.shape[0]


@dataclass
class AWQLayout:
    qweight: torch.Tensor  # int32 [K, packed_size(N, 4)], AWQ_ORDER
    scales: torch.Tensor  # float [G, N]
    qzeros: torch.Tensor  # int32 [G, packed_size(N, 4)], AWQ_ORDER
    group_size: int
    in_features: int
    out_features: int
    bits: int = 4

    def __post_init__(self):
        if self.bits != 4:
            raise ValueError(f"AWQ layout holds 4-bit codes only, got bits={self.bits}")
        _check_packed("qweight", self.qweight, (self.in_features, packed_size(self.out_features, 4)))
        G = -(-self.in_features // self.group_size)
        _check_shape("scales", self.scales, (G, self.out_features))
        _check_packed("qzeros", self.qzeros, (G, packed_size(self.out_features, 4)))


class _DenseWeight:
    """An 8-bit weight stored unpacked as [N, K]."""

    weight: torch.Tensor

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


@dataclass
class Int8Layout(_DenseWeight):
    weight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # float32 [N]
    dynamic_act: bool = False  # W8A8: int8 activations, per-token scales (kernels.act_quant)

    def __post_init__(self):
        if self.weight.dtype != torch.int8 or self.weight.dim() != 2:
            raise ValueError(f"int8 weight must be a 2-d int8 tensor, got {self.weight.dtype} {list(self.weight.shape)}")
        _check_shape("scales", self.scales, (self.weight.shape[0],))


@dataclass
class FP8Layout(_DenseWeight):
    weight: torch.Tensor  # float8_e4m3fn [N, K]
    scales: torch.Tensor  # float32, 0-d (per tensor) or [N] (per channel)
    dynamic_act: bool = False  # W8A8: FP8 activations, per-token scales (kernels.act_quant)
    act_scale_ub: float | None = None  # cap on a token's activation amax (FBGEMM's activation_scale_ub)

    def __post_init__(self):
        if self.weight.dtype != torch.float8_e4m3fn or self.weight.dim() != 2:
            raise ValueError(f"FP8 weight must be a 2-d float8_e4m3fn tensor, got {self.weight.dtype} {list(self.weight.shape)}")
        if self.scales.dim() != 0:
            _check_shape("scales", self.scales, (self.weight.shape[0],))


@dataclass
class CodebookPart:
    """Internal columns of one codebook block: codes index codebook vectors of og x ig weights."""

    codes: torch.Tensor  # int32 [No, Ki, C], code values in [0, E)
    codebooks: torch.Tensor  # float [Gk, C, E, og, ig]
    scales: torch.Tensor | None  # float [No] per out-group; None: 1
    group_cols: int  # columns per codebook group (kg = (k + k_offset) // group_cols)
    k_offset: int  # columns of the first codebook group before this part's first column
    out_skip: int  # decoded rows before the first row (a vector straddling a rank boundary)
    out_features: int
    in_features: int

    def __post_init__(self):
        if self.codes.dtype != torch.int32 or self.codes.dim() != 3:
            raise ValueError(f"codes must be int32 [No, Ki, C], got {self.codes.dtype} {list(self.codes.shape)}")
        no, ki, c = self.codes.shape
        gk, cc, _, og, ig = self.codebooks.shape
        if cc != c:
            raise ValueError(f"codes have {c} codebooks, codebooks {cc}")
        if no * og < self.out_skip + self.out_features or ki * ig != self.in_features:
            raise ValueError(f"codes {list(self.codes.shape)} with groups {og}x{ig} do not cover "
                             f"{self.out_features} rows from {self.out_skip} and {self.in_features} columns")
        if self.group_cols % ig or self.k_offset % ig:
            raise ValueError(f"codebook groups of {self.group_cols} columns from {self.k_offset} split "
                             f"in-groups of {ig}")
        if gk * self.group_cols < self.k_offset + self.in_features:
            raise ValueError(f"{gk} codebook groups of {self.group_cols} columns do not cover "
                             f"{self.in_features} columns from {self.k_offset}")
        if self.scales is not None:
            _check_shape("scales", self.scales, (no,))


@dataclass
class CodebookBlock:
    """Rows of a codebook layout: parts side by side, then permuted and normalized columns."""

    parts: tuple[CodebookPart, ...]
    perm: torch.Tensor | None = None  # int64 [K]: internal column j is column perm[j]; None: identity
    col_scale: torch.Tensor | None = None  # float [K]
    col_bias: torch.Tensor | None = None  # float [K]

    def __post_init__(self):
        rows = {p.out_features for p in self.parts}
        if len(rows) != 1:
            raise ValueError(f"parts of one block have different row counts {sorted(rows)}")
        for name in ("perm", "col_scale", "col_bias"):
            t = getattr(self, name)
            if t is not None:
                _check_shape(name, t, (self.in_features,))

    @property
    def in_features(self) -> int:
        return sum(p.in_features for p in self.parts)

    @property
    def out_features(self) -> int:
        return self.parts[0].out_features


@dataclass
class CodebookLayout:
    """A codebook-quantized weight (AQLM, VPTQ): blocks stacked along N."""

    blocks: tuple[CodebookBlock, ...]

    def __post_init__(self):
        cols = {b.in_features for b in self.blocks}
        if len(cols) != 1:
            raise ValueError(f"blocks of one layout have different in_features {sorted(cols)}")

    @property
    def in_features(self) -> int:
        return self.blocks[0].in_features

    @property
    def out_features(self) -> int:
        return sum(b.out_features for b in self.blocks)

    @property
    def device(self) -> torch.device:
        return self.blocks[0].parts[0].codes.device


@dataclass
class LUT4Layout:
    """4-bit codes that index a 16-entry float table, one absmax per block of `blocksize` along K."""

    qweight: torch.Tensor  # uint8 [N, K/2]: byte j of row n holds k = 2j in its high nibble, 2j+1 in its low
    absmax: torch.Tensor  # float32 [N, K / blocksize]
    table: torch.Tensor  # float32 [16], the value of each code
    blocksize: int

    def __post_init__(self):
        if self.qweight.dtype != torch.uint8 or self.qweight.dim() != 2:
            raise ValueError(f"LUT4 qweight must be a 2-d uint8 tensor, got {self.qweight.dtype} {list(self.qweight.shape)}")
        if self.in_features % self.blocksize:
            raise ValueError(f"K={self.in_features} is not a multiple of blocksize={self.blocksize}")
        _check_shape("absmax", self.absmax, (self.out_features, self.in_features // self.blocksize))
        _check_shape("table", self.table, (16,))

    @property
    def in_features(self) -> int:
        return 2 * self.qweight.shape[1]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]


def _check_shape(name: str, t: torch.Tensor, want: tuple[int, ...]) -> None:
    if tuple(t.shape) != want:
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(want)}")


def _check_packed(name: str, t: torch.Tensor, want: tuple[int, ...]) -> None:
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 packed codes, got {t.dtype}")
    _check_shape(name, t, want)

"""The canonical weight layouts the kernels read. Quant loaders convert checkpoints into these.

Dequantization, for each layout (k: input feature, n: output feature):
- GPTQLayout:  w[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n],  g(k) = g_idx[k] or k // group_size,
               z = the true zero point (GPTQ v2 semantics; v1's stored z - 1 is fixed at load),
               z = 2**(bits-1) everywhere when qzeros is None (symmetric).
- AWQLayout:   the same formula; qweight [K, N] is packed along N in AWQ_ORDER, no g_idx.
- Int8Layout:  w[n, k] = q[n, k] * s[n]         (int8 codes, per-output-channel scales)
- FP8Layout:   w[n, k] = float(q[n, k]) * s[n]  (float8_e4m3fn, per-tensor (s is 0-d) or per-channel)
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


def _check_shape(name: str, t: torch.Tensor, want: tuple[int, ...]) -> None:
    if tuple(t.shape) != want:
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(want)}")


def _check_packed(name: str, t: torch.Tensor, want: tuple[int, ...]) -> None:
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 packed codes, got {t.dtype}")
    _check_shape(name, t, want)

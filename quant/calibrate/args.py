"""What to quantize to (`QuantArgs`) and what comes out (`QuantResult`), shared by RTN and GPTQ.

Code convention, the one every checkpoint writer packs: codes are unsigned in [0, 2^bits - 1],
zero points are TRUE zero points in the same range (never the GPTQ-v1 `z - 1`, which wraps when
z = 0), and a weight is (code - zero[g]) * scale[g] with g = g_idx[column].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.errors import InputError

SUPPORTED_BITS = (2, 3, 4, 8)
STRATEGIES = ("tensor", "channel", "group")
ACTORDERS = ("none", "static", "group", "weight")
OBSERVERS = ("minmax", "mse")
DEFAULT_GROUP_SIZE = 128
# compressed-tensors spellings: "dynamic" is an alias of "group"; None / bools as in its configs.
_ACTORDER_ALIASES = {"dynamic": "group", None: "none", False: "none", True: "group"}


def _smallest_dividing_group_size_above(in_features: int, requested: int) -> int:
    """The smallest group size > `requested` that divides `in_features` (in_features at worst)."""
    return next(size for size in range(requested + 1, in_features + 1) if in_features % size == 0)


def largest_dividing_group_size(in_features: int, requested: int) -> int:
    """The largest group size <= `requested` that divides `in_features` (1 at worst)."""
    for size in range(min(requested, in_features), 0, -1):
        if in_features % size == 0:
            return size
    return 1


@dataclass(frozen=True)
class QuantArgs:
    """Weight-only integer quantization of one linear layer.

    strategy "group": one scale/zero per (output row, group of `group_size` input columns);
        group_size=-1 means one group over all of K (same result as "channel").
        group_size=None means DEFAULT_GROUP_SIZE (128).
    strategy "channel": one scale/zero per output row; "tensor": one for the whole weight.
        group_size must then be None or -1.
    actorder (GPTQ only; RTN ignores it):
        "none":   columns processed in their natural order.
        "group":  columns processed in descending Hessian-diagonal order and groups formed in
                  that permuted order, so g_idx is a non-trivial permutation of groups.
                  Needs strategy "group".
        "weight": processed in act order, groups and their params in original column order,
                  computed up front from the weight; trivial g_idx.
        "static": original GPTQ's static_groups = every group's params computed up front from
                  the original weight, then processed in act order. That is exactly "weight"
                  (compressed-tensors also defines "static" as an alias of "weight").
        For "channel"/"tensor", "weight"/"static" reorder processing only (params are per row).
    observer: how each group's scale/zero are chosen (rtn.compute_qparams):
        "minmax": from the group's min/max (widened to include 0).
        "mse":    the min/max range shrunk by the factor in a grid search that minimises the
                  group's ||q(w) - w||^2.4 (original GPTQ's Quantizer with mse=True).
    """

    bits: int = 4
    group_size: int | None = None
    sym: bool = True
    strategy: str = "group"
    actorder: str = "none"
    observer: str = "minmax"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise InputError(f"bits={self.bits!r} is not supported; choose one of {SUPPORTED_BITS}")
        strategy = self.strategy.lower() if isinstance(self.strategy, str) else self.strategy
        if strategy not in STRATEGIES:
            raise InputError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")
        actorder = self.actorder.lower() if isinstance(self.actorder, str) else self.actorder
        actorder = _ACTORDER_ALIASES.get(actorder, actorder)
        if actorder not in ACTORDERS:
            raise InputError(f"unknown actorder {self.actorder!r}; choose one of {ACTORDERS}")

        if self.observer not in OBSERVERS:
            raise InputError(f"unknown observer {self.observer!r}; choose one of {OBSERVERS}")
        group_size = self.group_size
        if strategy == "group":
            group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
            if group_size != -1 and group_size < 1:
                raise InputError(f"group_size={group_size} is invalid; use a positive size, or -1 for "
                                 f"one group over all input columns")
        elif group_size not in (None, -1):
            raise InputError(f"group_size={group_size} only applies to strategy 'group' "
                             f"(got strategy {strategy!r}); leave it None or -1")
        else:
            group_size = -1
        if actorder == "group" and strategy != "group":
            raise InputError(f"actorder 'group' permutes groups and needs strategy 'group' "
                             f"(got {strategy!r}); use actorder 'weight' instead")
        object.__setattr__(self, "strategy", strategy)
        object.__setattr__(self, "actorder", actorder)
        object.__setattr__(self, "group_size", group_size)

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        """The zero point of symmetric quantization: signed code 0 shifted to unsigned."""
        return 1 << (self.bits - 1)

    def columns_per_group(self, in_features: int) -> int:
        """The effective group size for a weight with `in_features` columns, validated."""
        if self.strategy != "group" or self.group_size == -1:
            return in_features
        if in_features % self.group_size != 0:
            below = largest_dividing_group_size(in_features, self.group_size)
            message = (f"group_size {self.group_size} does not divide the layer's {in_features} input columns; "
                       f"the largest group size that divides {in_features} is {below} among those below "
                       f"{self.group_size}")
            if self.group_size < in_features:
                above = _smallest_dividing_group_size_above(in_features, self.group_size)
                message += f", the smallest above it is {above}"
            raise InputError(message)
        return self.group_size


@dataclass
class QuantResult:
    """A quantized weight [N, K] in the unsigned-code / true-zero-point convention.

    codes:  int32 [N, K] in [0, 2^bits - 1].
    scales: float32 [N, G]; zeros: int32 [N, G] in [0, 2^bits - 1] (symmetric: 2^(bits-1)).
    g_idx:  int32 [K], the group of each input column; k // group_size unless actorder "group".
    group_size: columns per group (K for channel/tensor). loss: GPTQ's loss summed over the layer.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    group_size: int
    bits: int
    sym: bool
    loss: float

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def has_trivial_g_idx(self) -> bool:
        """True when g_idx is k // group_size (writers may then omit it)."""
        trivial = torch.arange(self.g_idx.numel(), device=self.g_idx.device) // self.group_size
        return bool(torch.equal(self.g_idx.long(), trivial))

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] = (codes - zeros[:, g_idx]) * scales[:, g_idx]: the single source of truth."""
        g_idx = self.g_idx.long()
        return (self.codes - self.zeros[:, g_idx]).float() * self.scales[:, g_idx]

"""Random weights in a format's own layout, described rather than made: a Packer's
`random_tensors` says, per tensor, its shape and what kind of values fill it, and
engine.dummy synthesizes any box of it on the rank's device (so no rank builds more than its shard).

Kinds (`value` means):
    uniform    floats uniform in [-value, value]
    ones       1.0
    codes      int32 words with every bit random: uniformly random codes in every packed field
    const      one int32 word everywhere (e.g. a zero point repeated in every field)
    scales     floats uniform in [0.75, 1.25] * value
    group_ids  int32 k // value along the tensor's one dim
    values     the tensor's every element, row-major (`value` a tuple): a format's small fixed
               tensors (a code table, a layer's shape, bookkeeping bytes); `fixed` makes one
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("uniform", "ones", "codes", "const", "scales", "group_ids", "values")


@dataclass(frozen=True)
class RandomTensor:
    shape: tuple[int, ...]
    kind: str
    value: float | int | tuple = 0.0
    dtype: torch.dtype | None = None  # None: the model's float dtype

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"random tensor kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "values":
            count = 1
            for size in self.shape:
                count *= size
            if not isinstance(self.value, tuple) or len(self.value) != count:
                raise ValueError(f"a 'values' random tensor of shape {list(self.shape)} needs a tuple of {count} "
                                 f"values, got {self.value!r}")


def fixed(t: torch.Tensor) -> RandomTensor:
    """A small tensor stored exactly as given (kind 'values')."""
    return RandomTensor(tuple(t.shape), "values", tuple(t.flatten().tolist()), t.dtype)


def const_word(code: int, bits: int) -> int:
    """The int32 word holding `code` in every `bits`-wide field (two's complement)."""
    word = 0
    for i in range(32 // bits):
        word |= code << (bits * i)
    return word - (1 << 32) if word >= 1 << 31 else word


def uniform_code_scale(bits: int, weight_std: float) -> float:
    """The scale s giving (q - z) * s the std `weight_std` for codes q uniform over [0, 2^b) and z
    mid-range: that std is s * sqrt((4^b - 1) / 12)."""
    levels = 1 << bits
    return weight_std / ((levels * levels - 1) / 12) ** 0.5

"""HQQ's bit packing, read for a range of output rows.

A layer [N, K] with group size gs (axis 1) has G = N*K/gs groups; group r is row n = r // (K/gs),
columns (r % (K/gs)) * gs ...; the codes form a [G, gs] matrix. Packing splits its rows into P equal
chunks of `step` rows and stores chunk j in field j of each word of a [step, gs] tensor W_q:
    8bit_u8 (8, 6, 5 bits): P = 1, uint8;  4bit_u8: P = 2, chunk j at bits 4-4j of a uint8;
    2bit_u8: P = 4, bits 6-2j;  1bit_u8: P = 8, bits 7-j;
    3bit_32: P = 10, int32, bits 27-3j, G zero-padded to 10*step rows (step = ceil(G/10)).
scale and zero are [G, 1] in the compute dtype; w = (q - zero) * scale, in that dtype.

A rank owning output rows [n0, n1) needs code rows [n0*K/gs, n1*K/gs): of each chunk the part
inside that range, i.e. one box of W_q's rows per chunk, read as the union box. Column-parallel
ranks so read only words that hold their codes; row-parallel ranks need every row and read all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.base import QuantConfigError

# packing name -> (fields per word, bits per field, word dtype)
PACKINGS = {"8bit_u8": (1, 8, torch.uint8), "4bit_u8": (2, 4, torch.uint8), "2bit_u8": (4, 2, torch.uint8),
            "1bit_u8": (8, 1, torch.uint8), "3bit_32": (10, 3, torch.int32)}
PACKING_OF_BITS = {8: "8bit_u8", 6: "8bit_u8", 5: "8bit_u8", 4: "4bit_u8", 3: "3bit_32", 2: "2bit_u8", 1: "1bit_u8"}


@dataclass(frozen=True)
class PackedCodes:
    """Where a layer's codes are: `groups` rows of `group_size` codes, P chunks of `step` rows."""

    packing: str
    groups: int
    group_size: int

    @property
    def fields(self) -> int:
        return PACKINGS[self.packing][0]

    @property
    def step(self) -> int:
        return -(-self.groups // self.fields)

    def stored_shape(self, stored_dtype: torch.dtype) -> list[int]:
        """W_q's shape; a float view (view_as_float) changes the last dim by the itemsize ratio."""
        word = PACKINGS[self.packing][2]
        return [self.step, self.group_size * word.itemsize // stored_dtype.itemsize]

    def check_exact(self, name: str) -> None:
        if self.packing != "3bit_32" and self.groups % self.fields:
            raise QuantConfigError(f"tensor {name}: {self.groups} groups do not split into {self.fields} equal chunks "
                                   f"({self.packing}); the checkpoint cannot have been packed by hqq")

    def boxes(self, r0: int, r1: int) -> list[tuple[int, int, int]]:
        """(field, first, last) W_q rows holding code rows [r0, r1), per field that has any."""
        out = []
        for j in range(self.fields):
            lo, hi = max(r0, j * self.step), min(r1, (j + 1) * self.step)
            if lo < hi:
                out.append((j, lo - j * self.step, hi - j * self.step))
        return out

    def decode(self, words: torch.Tensor, field: int) -> torch.Tensor:
        """Field `field` of each word as int32 codes."""
        _, bits, _ = PACKINGS[self.packing]
        shift = 27 - 3 * field if self.packing == "3bit_32" else 8 - bits * (field + 1)
        return (words.to(torch.int32) >> shift) & ((1 << bits) - 1)


def read_code_rows(read, name: str, stored_dtype: torch.dtype, codes: PackedCodes, r0: int, r1: int) -> torch.Tensor:
    """Code rows [r0, r1) as int32 [r1 - r0, group_size]; `read(name, index)` reads raw boxes of W_q."""
    boxes = codes.boxes(r0, r1)
    first, last = min(b[1] for b in boxes), max(b[2] for b in boxes)
    words = read(name, (slice(first, last), slice(None)))
    word_dtype = PACKINGS[codes.packing][2]
    if words.dtype != word_dtype:  # view_as_float: the same bytes under a float dtype
        words = words.contiguous().view(word_dtype)
    parts = [codes.decode(words[a - first: b - first], j) for j, a, b in boxes]  # fields in code-row order
    return torch.cat(parts, 0)

"""Writing exl2 layers: `Exl2Layer` (a layer in exl2's own terms), `exl2_quantize` (round-to-nearest
with exllamav2's scale search and bit-width split, no calibration) and `Exl2Packer` for
`quant.export`. The tensors follow quant.exl2.format; `pack_layer` reproduces exllamav2 0.3.2's
`AdaptiveGPTQ.pack` byte for byte (checked in tests/quant/test_exl2.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from kernels.packing import pack_int32
from quant.base import Packer
from quant.exl2.format import EXL2_BITS, SCALE_BITS, padded_columns

FORMAT_VERSION = "0.3.2"  # the exllamav2 release whose layout this writes
SCALE_CODES = 1 << SCALE_BITS  # qs + 1 in 1..16


@dataclass
class Exl2Layer:
    """One quantized layer; rows in stored (permuted) order: stored row i is input row perm[i]."""

    codes: torch.Tensor  # int32 [K, N] unsigned codes of the stored rows
    bits: list[int]  # per group
    rows: list[int]  # stored rows per group
    qscale: torch.Tensor  # int32 [G, N] in 1..16 (stored as qscale - 1)
    qscale_max: torch.Tensor  # float16 [G]
    invperm: torch.Tensor  # int64 [K]: stored row of input row k

    def group_of_rows(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(self.rows)), torch.tensor(self.rows))

    def scales(self) -> torch.Tensor:
        """float32 [G, N], exactly exllamav2's fp16 scales."""
        top = (self.qscale_max.float() / 256).half().float()
        return (self.qscale.float() ** 2 * top[:, None]).half().float()

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] in the original input order."""
        g = self.group_of_rows()
        zeros = (1 << (torch.tensor(self.bits) - 1))[g]
        stored = (self.codes - zeros[:, None]).float() * self.scales()[g]
        return stored[self.invperm].T.contiguous()


@dataclass(frozen=True)
class Exl2Recipe:
    """How a layer's rows split into bit widths, as exllamav2's QParams: `bits` (widest first) take
    `proportions` of the rows, in groups of `group_size` rows (int, or one size per width)."""

    bits: tuple[int, ...] = (4,)
    proportions: tuple[float, ...] = (1.0,)
    group_size: int | tuple[int, ...] = 32
    p_grid: tuple[float, ...] = field(default=tuple(0.80 + 0.05 * i for i in range(9)))  # scale search

    def __post_init__(self):
        if len(self.bits) != len(self.proportions) or not self.bits:
            raise ValueError(f"exl2 recipe: {len(self.bits)} bit widths but {len(self.proportions)} proportions")
        if any(b not in EXL2_BITS for b in self.bits) or list(self.bits) != sorted(self.bits, reverse=True):
            raise ValueError(f"exl2 recipe bits {self.bits}: widths of {EXL2_BITS}, widest first")
        if abs(sum(self.proportions) - 1) > 1e-6 or min(self.proportions) <= 0:
            raise ValueError(f"exl2 recipe proportions {self.proportions} must be positive and sum to 1")
        for b, g in zip(self.bits, self.sizes()):
            if g <= 0 or g % (16 if b == 2 else 32):
                raise ValueError(f"exl2 recipe: {b}-bit groups of {g} rows; exllamav2's kernel needs multiples of 32 "
                                 f"(16 for 2 bits)")

    def sizes(self) -> tuple[int, ...]:
        return self.group_size if isinstance(self.group_size, tuple) else (self.group_size,) * len(self.bits)

    def groups(self, rows: int) -> list[tuple[int, int]]:
        """(bits, rows) of each group, as exllamav2's AdaptiveGPTQ.configure / quantize lay them out."""
        out, left = [], rows
        for i, (b, p, size) in enumerate(zip(self.bits, self.proportions, self.sizes())):
            count = math.ceil(min(rows * p, left) / size) if i < len(self.bits) - 1 else math.ceil(left / size)
            for _ in range(max(count, 0)):
                if left <= 0:
                    break
                out.append((b, min(size, left)))
                left -= out[-1][1]
        return out


def exl2_quantize(weight: torch.Tensor, recipe: Exl2Recipe, perm: torch.Tensor | None = None) -> Exl2Layer:
    """Round-to-nearest exl2 quantization of a float weight [N, K]. `perm` (stored row i = input row
    perm[i]; identity if None) stands in for the act-order exllamav2 gets from calibration. Per
    group, as exllamav2's AdaptiveQuantizer: per-column base scale max|w| / (maxq / 2), 4-bit
    square-root coded relative to the group's largest, then the fp16 maximum scaled by the p of
    `recipe.p_grid` with the least error (sum |err|^3.5, exllamav2's norm)."""
    w = weight.detach().float().T  # [K, N]
    k = w.shape[0]
    perm = torch.arange(k) if perm is None else perm.long()
    w = w[perm]
    layout = recipe.groups(k)
    codes, qscales, maxima = torch.empty(w.shape, dtype=torch.int32), [], []
    row = 0
    for b, rows in layout:
        x = w[row: row + rows]
        maxq, zero = (1 << b) - 1, 1 << (b - 1)
        base = x.abs().amax(0) + 1e-12
        base = base / (maxq / 2)
        top = base.max()
        qs = torch.clamp(torch.round(torch.sqrt(base / top) * SCALE_CODES), 1, SCALE_CODES)
        best = None
        for p in recipe.p_grid:
            qmax = (top * p).half()
            scale = ((qs * qs).half().float() * (qmax.float() / 256).half().float()).half().float()
            q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            err = ((q - zero) * scale - x).abs().pow(3.5).sum()
            if best is None or err < best[0]:
                best = (err, q, qmax)
        codes[row: row + rows] = best[1].to(torch.int32)
        qscales.append(qs.to(torch.int32))
        maxima.append(best[2])
        row += rows
    return Exl2Layer(codes, [b for b, _ in layout], [r for _, r in layout], torch.stack(qscales),
                     torch.stack(maxima).to(torch.float16), torch.argsort(perm))


def pack_layer(prefix: str, layer: Exl2Layer) -> dict[str, torch.Tensor]:
    """The layer's exl2 tensors. Columns are padded to a multiple of 32 as exllamav2 does: codes with
    the zero point, scales with code 0 - 1, which exllamav2 ORs in as 0xFFFF and so fills every padded
    nibble with 0xF (written the same, so files match byte for byte)."""
    k, n = layer.codes.shape
    pad = padded_columns(n) - n
    q_weight, q_groups, qrow, row = [], [], 0, 0
    for b, rows in zip(layer.bits, layer.rows):
        group = layer.codes[row: row + rows]
        if pad:
            group = torch.cat([group, group.new_full((rows, pad), 1 << (b - 1))], 1)
        words = pack_int32(group, b, 0)[: -(-rows * b // 32)]  # exllamav2 keeps only the rows it fills
        q_weight.append(words)
        q_groups += [b, qrow]
        qrow += words.shape[0]
        row += rows
    scale_codes = layer.qscale - 1
    if pad:
        scale_codes = torch.cat([scale_codes, scale_codes.new_full((scale_codes.shape[0], pad), SCALE_CODES - 1)], 1)
    return {f"{prefix}.q_weight": torch.cat(q_weight).contiguous(),
            f"{prefix}.q_scale": pack_int32(scale_codes, SCALE_BITS, 1),
            f"{prefix}.q_scale_max": layer.qscale_max.to(torch.float16).contiguous(),
            f"{prefix}.q_groups": torch.tensor(q_groups, dtype=torch.int16),
            f"{prefix}.q_invperm": layer.invperm.to(torch.int32).contiguous()}


class Exl2Packer(Packer):
    """Writes exl2 layers from `Exl2Layer`s (what `exl2_quantize` returns) for `quant.export`."""

    method = "exl2"

    def __init__(self, head_bits: int = 16):
        self.head_bits = head_bits
        self._bits = 0
        self._weights = 0

    def pack(self, prefix: str, result, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if not isinstance(result, Exl2Layer):
            raise ValueError(f"{prefix}: exl2 stores its own scales (4-bit per column times an fp16 maximum per "
                             f"group), so it packs an Exl2Layer from quant.exl2.packer.exl2_quantize, not a "
                             f"{type(result).__name__}")
        n = result.codes.shape[1]
        self._bits += sum(b * r for b, r in zip(result.bits, result.rows)) * n
        self._weights += result.codes.numel()
        return pack_layer(prefix, result)

    def quantization_config(self) -> dict[str, Any]:
        """As exllamav2's convert writes it; bits = the average code width written (its target bpw)."""
        bits = round(self._bits / self._weights, 2) if self._weights else None
        return {"quant_method": "exl2", "version": FORMAT_VERSION, "bits": bits, "head_bits": self.head_bits,
                "calibration": {"rows": 0, "length": 0, "dataset": "(none: round-to-nearest)"}}

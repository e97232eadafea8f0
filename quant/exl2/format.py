"""exl2 (exllamav2) tensors of one linear layer: what they mean, and their consistency checks.

Layer `{prefix}` with K in-features and N out-features; every input row k is stored at row
q_invperm[k] of the layer's permuted ("stored") order, whose rows fall into consecutive groups,
each with its own bit width:
    q_groups    int16 [2G]          (bits, first q_weight row) per group; bits in 2/3/4/5/6/8, never
                                    increasing (the kernel decodes 8-bit rows first, then 6, 5, 4, 3, 2)
    q_weight    int32 [R, N']       each group's codes packed along rows as a little-endian bit
                                    stream (3-bit: 32 rows in 3 words, 5-bit: 32 in 5, 6-bit: 16 in 3)
    q_scale     int32 [G, N'/8]     4-bit scale codes qs, 8 per word along N, lowest nibble first
    q_scale_max float16 [G]         the group's largest scale
    q_invperm   int [K]             stored row of input row k (q_perm = argsort(q_invperm), optional)
N' is N or N rounded up to 32 (exllamav2's packer pads the columns). A group's row count is its
q_weight rows * 32 / bits (the last group: the rows left). Dequantization, in exllamav2's fp16:
    scale[g, n] = fp16( (qs[g, n] + 1)^2 * fp16(q_scale_max[g] / 256) )
    W[n, k]     = (code[i, n] - 2^(bits_g - 1)) * scale[g, n],   i = q_invperm[k] in group g
(exllamav2's kernel rounds that product to fp16 once more; qshard keeps it exact in float32.)

Checked against exllamav2 0.3.2: its packer (conversion/adaptivegptq.py `pack`, run verbatim with
the CUDA `pack_columns` / `pack_rows_4` kernels transcribed), its loader (ext.py `make_q_matrix`:
q_scale_max / 256; module.py: q_perm = argsort(q_invperm)) and reconstruct kernel (q_matrix.cu,
qdq_util.cuh `dq_scale`, the qdq_*.cuh plain-order decoders); see tests/quant/test_exl2.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.packing import packed_size, run_shape, unpack_int32
from kernels.errors import QShardError

EXL2_BITS = (8, 6, 5, 4, 3, 2)
SCALE_BITS = 4
COLUMN_PAD = 32  # exllamav2 pads N to a multiple of 32 in q_weight and q_scale
LAYOUT_BITS = (2, 3, 4, 8)  # GPTQLayout widths the kernels run


class Exl2FormatError(QShardError, ValueError):
    """exl2 tensors that contradict each other; the message names the tensor and values."""


def padded_columns(n: int) -> int:
    return -(-n // COLUMN_PAD) * COLUMN_PAD


def layout_width(bits: list[int] | tuple[int, ...]) -> int:
    """The narrowest GPTQLayout width that holds every group's codes (and zero point) exactly."""
    top = max(bits)
    return next(w for w in LAYOUT_BITS if w >= top)


@dataclass(frozen=True)
class GroupTable:
    """The layer's groups in stored-row order."""

    bits: tuple[int, ...]
    qrow: tuple[int, ...]  # first q_weight row of each group
    rows: tuple[int, ...]  # stored (input) rows of each group
    qrows_total: int  # rows of q_weight

    @property
    def count(self) -> int:
        return len(self.bits)

    def row_starts(self, device=None) -> torch.Tensor:
        starts = [0]
        for r in self.rows[:-1]:
            starts.append(starts[-1] + r)
        return torch.tensor(starts, dtype=torch.int64, device=device)

    def qrow_stop(self, g: int) -> int:
        return self.qrow[g + 1] if g + 1 < self.count else self.qrows_total

    @classmethod
    def parse(cls, prefix: str, q_groups: torch.Tensor, qweight_rows: int, in_features: int) -> "GroupTable":
        name = f"{prefix}.q_groups"
        if q_groups.dim() != 1 or q_groups.numel() < 2 or q_groups.numel() % 2:
            raise Exl2FormatError(f"tensor {name} has shape {list(q_groups.shape)}; exl2 stores (bits, q_weight row) "
                                  f"pairs, a 1-D tensor of even length")
        if q_groups.dtype.is_floating_point:
            raise Exl2FormatError(f"tensor {name} is {q_groups.dtype}; exl2 stores int16 pairs")
        pairs = q_groups.to(torch.int64).reshape(-1, 2).tolist()
        bits = tuple(p[0] for p in pairs)
        qrow = tuple(p[1] for p in pairs)
        for g, b in enumerate(bits):
            if b not in EXL2_BITS:
                raise Exl2FormatError(f"tensor {name}: group {g} has bits={b}; exl2 groups have "
                                      f"{'/'.join(map(str, sorted(EXL2_BITS)))} bits")
            if g and b > bits[g - 1]:
                raise Exl2FormatError(f"tensor {name}: group {g} has {b} bits after group {g - 1}'s {bits[g - 1]}; "
                                      f"exl2 groups never widen (its kernel reads 8-bit rows first, then 6, 5, 4, "
                                      f"3, 2)")
        if qrow[0] != 0:
            raise Exl2FormatError(f"tensor {name}: group 0 starts at q_weight row {qrow[0]}, not 0")
        rows = []
        for g in range(len(bits) - 1):
            qrows = qrow[g + 1] - qrow[g]
            codes, words = run_shape(bits[g])
            if qrows <= 0 or qrows % words:
                raise Exl2FormatError(
                    f"tensor {name}: group {g} ({bits[g]}-bit) spans q_weight rows [{qrow[g]}, {qrow[g + 1]}), "
                    f"{qrows} rows, which is not a positive multiple of {words} (a {bits[g]}-bit run of {codes} "
                    f"input rows fills {words} words)")
            rows.append(qrows * 32 // bits[g])
        last = len(bits) - 1
        left = in_features - sum(rows)
        if left <= 0:
            raise Exl2FormatError(f"tensor {name}: groups 0..{last - 1} already hold {sum(rows)} input rows, which "
                                  f"leaves none for the last group of in_features={in_features}")
        qrows_last = qweight_rows - qrow[last]
        need, whole = -(-left * bits[last] // 32), packed_size(left, bits[last])
        if not need <= qrows_last <= whole:
            raise Exl2FormatError(
                f"tensor {prefix}.q_weight has {qweight_rows} rows; its last group ({bits[last]}-bit, from row "
                f"{qrow[last]}) must hold the {left} input rows left of in_features={in_features}, packed in "
                f"{need}{'' if need == whole else f'..{whole}'} q_weight rows, not {qrows_last}: q_groups disagree "
                f"with the tensor sizes")
        rows.append(left)
        return cls(bits, qrow, tuple(rows), qweight_rows)


def decode_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """A block of q_weight rows [w, n] starting at a run boundary -> codes [rows, n] (a partial last
    run is zero-padded first)."""
    _, per_run = run_shape(bits)
    short = -words.shape[0] % per_run
    if short:
        words = torch.cat([words, words.new_zeros(short, words.shape[1])])
    return unpack_int32(words, bits, 0)


def scales_from(qs_words: torch.Tensor, q_scale_max: torch.Tensor, count: int) -> torch.Tensor:
    """float32 [g, count] scales, exactly as exllamav2's fp16 arithmetic gives them, from q_scale
    words [g, >= count/8] and q_scale_max [g]."""
    qs = unpack_int32(qs_words, SCALE_BITS, 1)[:, :count].to(torch.float32) + 1
    top = (q_scale_max.to(torch.float32) / 256).to(torch.float16).to(torch.float32)
    # qs^2 <= 256 and top has 11 significant bits: the float32 product is exact, one rounding to fp16
    return (qs * qs * top[:, None]).to(torch.float16).to(torch.float32)


def check_permutation(prefix: str, invperm: torch.Tensor, q_perm: torch.Tensor | None, in_features: int) -> None:
    name = f"{prefix}.q_invperm"
    if list(invperm.shape) != [in_features]:
        raise Exl2FormatError(f"tensor {name} has shape {list(invperm.shape)}, expected [{in_features}] (in_features)")
    if not torch.equal(torch.sort(invperm).values, torch.arange(in_features, device=invperm.device)):
        raise Exl2FormatError(f"tensor {name} is not a permutation of 0..{in_features - 1}")
    if q_perm is not None:
        identity = torch.arange(in_features, device=invperm.device)
        if list(q_perm.shape) != [in_features] or not torch.equal(q_perm[invperm], identity):
            raise Exl2FormatError(f"tensor {prefix}.q_perm is not the inverse of {name} (q_perm[q_invperm[k]] must "
                                  f"be k)")

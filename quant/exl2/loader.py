"""exl2 checkpoints (exllamav2, `quant_method: "exl2"`): the loader. Tensors: quant.exl2.format;
writer and quantizer: quant.exl2.packer.

Sharding, through the rules table (`logical_ranges` over parallel.sharding.CUTS) like GPTQ:
- column-parallel: the rank's blocks of N are columns of q_weight (and 4-bit words of q_scale,
  cut and re-sliced when a block starts inside a word); every row, group and the permutation whole.
- row-parallel: the rank's input rows [k0, k1) map through q_invperm to stored rows, which lie in
  whatever groups the permutation put them in; per group it touches, the rank reads the q_weight
  runs from the first to the last one holding its rows (spans that touch read as one box), and
  the q_scale rows from its first to its last group. Without a permutation that is its share (plus
  a partial run at each end); under exllamav2's usual act-order permutation a rank's rows are
  spread over every group and it reads most of q_weight: the format gives no cheaper exact cut.
q_scale_max is read in the engine's dtype: exact in float32/float16; bfloat16 rounds it, as it
rounds every scale in bf16 compute.

Compute: each stored part becomes ONE symmetric `GPTQLayout`, exact: width W = the narrowest of
2/3/4/8 bits holding the layer's widest group (5- and 6-bit groups ride in 8 bits); a b-bit code q
is stored as q + 2^(W-1) - 2^(b-1), so that every group's zero point becomes the layout's
symmetric 2^(W-1) (no zero-point table, and the CPU int4 path's offset stays small instead of
cancelling large terms in bf16); one scale row per group; g_idx = each input row's group, in the
original input order. One kernel call per layer on every backend the dispatch has (the CPU int4
path runs 8-bit as two nibble rows); splitting by width would save memory for mixed layers but
cost an activation gather and a kernel call per width. Fused layers (q/k/v, gate/up) whose parts
have the same local groups are concatenated into one layout; parts grouped differently run as
one layout each, outputs concatenated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kernels.layouts import GPTQLayout
from kernels.packing import pack_int32, run_shape
from parallel.sharding import Axis, LinearShard, TensorSource, logical_length, logical_ranges, tensor_name
from quant.base import KernelLinear, PackedLinear, QuantConfigError, WeightsLoader, register
from quant.exl2.format import (SCALE_BITS, Exl2FormatError, GroupTable, check_permutation, decode_rows,
                               layout_width, padded_columns, scales_from)
from quant.common.config_fields import config_field
from quant.common.packed_layers import dense_if_unquantized, read_whole

logger = logging.getLogger(__name__)

METHOD = "exl2"
REQUIRED = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")


@register(METHOD)
class Exl2Loader(WeightsLoader):
    method = METHOD

    def __init__(self, bits: float | None, head_bits: int | None):
        self.bits, self.head_bits = bits, head_bits

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Exl2Loader":
        """exllamav2's convert writes quant_method, version, bits (target bits per weight, a float),
        head_bits and calibration; every layer's tensors describe themselves, so only types are checked."""
        bits = config_field(config, ("bits",))
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 2 <= bits <= 8):
            raise QuantConfigError(f"exl2 quantization_config field bits={bits!r} must be the target bits per weight, "
                                   f"a number between 2 and 8")
        head_bits = config_field(config, ("head_bits",))
        if head_bits is not None and (isinstance(head_bits, bool) or not isinstance(head_bits, int)):
            raise QuantConfigError(f"exl2 quantization_config field head_bits={head_bits!r} must be an integer")
        return cls(bits, head_bits)

    def describe(self) -> str:
        return f"exl2(bits={self.bits}, head_bits={self.head_bits})"

    def load_linear(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        dense = dense_if_unquantized(weights, shard, "q_weight", METHOD)
        if dense is not None:
            return dense
        try:
            parts = [_read_source(weights, shard, src) for src in shard.sources]
        except Exl2FormatError as e:
            raise QuantConfigError(str(e)) from None
        merged = [parts[0]]
        for p in parts[1:]:
            if merged[-1].same_groups(p):
                merged[-1] = merged[-1].concat(p)
            else:
                merged.append(p)
        if len(merged) > 1:
            logger.debug("exl2: %s parts %s are grouped differently: %d layouts", shard.prefix, list(shard.sources),
                         len(merged))
        linears = [KernelLinear(p.layout(shard.local_in_features), weights.dtype) for p in merged]
        return linears[0] if len(linears) == 1 else ConcatLinear(linears)


class ConcatLinear(PackedLinear):
    """Parts of a fused layer quantized with different groups: one kernel each, outputs concatenated."""

    def __init__(self, parts: list[PackedLinear]):
        super().__init__(parts[0].in_features, sum(p.out_features for p in parts))
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts], dim=0)


@dataclass
class RankPart:
    """The rank's slice of one stored part, in the original input order, codes re-centred on
    2^(width-1) (see the module docstring)."""

    codes: torch.Tensor  # int32 [K_local, n] in [0, 2^width)
    scales: torch.Tensor  # float32 [G_local, n]
    g_idx: torch.Tensor  # int64 [K_local], into the local groups
    width: int

    def same_groups(self, other: "RankPart") -> bool:
        return self.width == other.width and torch.equal(self.g_idx, other.g_idx)

    def concat(self, other: "RankPart") -> "RankPart":
        return RankPart(torch.cat([self.codes, other.codes], 1), torch.cat([self.scales, other.scales], 1),
                        self.g_idx, self.width)

    def layout(self, in_features: int) -> GPTQLayout:
        return GPTQLayout(pack_int32(self.codes, self.width, 0), self.scales, None, self.g_idx.to(torch.int32),
                          self.width, in_features, in_features, self.codes.shape[1])


def _check_stored(weights: TensorSource, src: str, n: int) -> None:
    for suffix in REQUIRED:
        if not weights.has(tensor_name(src, suffix)):
            raise QuantConfigError(f"tensor {tensor_name(src, suffix)} is missing from the exl2 checkpoint")
    for suffix, widths in (("q_weight", (n, padded_columns(n))), ("q_scale", (-(-n // 8), padded_columns(n) // 8))):
        name = tensor_name(src, suffix)
        shape, dtype = list(weights.get_shape(name)), weights.get_dtype(name)
        if dtype != torch.int32 or len(shape) != 2 or shape[1] not in widths:
            shown = " or ".join(map(str, dict.fromkeys(widths)))
            raise QuantConfigError(f"tensor {name} is {dtype} {shape}, expected int32 [*, {shown}] for "
                                   f"out_features={n}")
    groups = weights.get_shape(tensor_name(src, "q_scale"))[0]
    for suffix, want in (("q_scale_max", [groups]), ("q_groups", [2 * groups])):
        shape = list(weights.get_shape(tensor_name(src, suffix)))
        if shape != want:
            raise QuantConfigError(f"tensor {tensor_name(src, suffix)} has shape {shape}, expected {want}: "
                                   f"{tensor_name(src, 'q_scale')} has {groups} group rows")


def _read_source(weights: TensorSource, shard: LinearShard, src: str) -> RankPart:
    k, n = shard.in_features, logical_length(shard, Axis.N, None, src)
    _check_stored(weights, src, n)
    qweight = tensor_name(src, "q_weight")
    table = GroupTable.parse(src, read_whole(weights, tensor_name(src, "q_groups")), weights.get_shape(qweight)[0], k)
    invperm = read_whole(weights, tensor_name(src, "q_invperm")).to(torch.int64)
    perm_name = tensor_name(src, "q_perm")
    q_perm = read_whole(weights, perm_name).to(torch.int64) if weights.has(perm_name) else None
    check_permutation(src, invperm, q_perm, k)

    (k0, k1), = logical_ranges(shard, Axis.K, None, src)
    n_ranges = logical_ranges(shard, Axis.N, None, src)
    stored = invperm[k0:k1]  # stored row of each of the rank's input rows
    gid = torch.searchsorted(table.row_starts(stored.device), stored, right=True) - 1
    touched = torch.unique(gid)  # sorted: the rank's groups, renumbered 0.. in this order
    codes = _gather_codes(weights, qweight, table, stored, gid, touched, n_ranges)
    g0, g1 = int(touched[0]), int(touched[-1]) + 1
    q_scale_max = read_whole(weights, tensor_name(src, "q_scale_max"))[g0:g1]
    scales = torch.cat([_read_scales(weights, tensor_name(src, "q_scale"), g0, g1, a, b, q_scale_max)
                        for a, b in n_ranges], 1)[touched - g0]
    return RankPart(codes, scales.contiguous(), torch.searchsorted(touched, gid), layout_width(table.bits))


def _gather_codes(weights: TensorSource, name: str, table: GroupTable, stored: torch.Tensor, gid: torch.Tensor,
                  touched: torch.Tensor, n_ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Codes [len(stored), n_local] of the given stored rows, re-centred on 2^(width-1): per group,
    the q_weight runs from the first to the last run holding one of the rows; spans that touch
    are read as one box per N range."""
    starts = table.row_starts(stored.device)
    width = layout_width(table.bits)
    codes = torch.empty(stored.numel(), sum(b - a for a, b in n_ranges), dtype=torch.int32, device=stored.device)
    spans = []  # (group, positions among the rank's rows, row within the span, first q_weight row, stop)
    for g in touched.tolist():
        mine = (gid == g).nonzero().squeeze(1)
        local = stored[mine] - int(starts[g])
        per_run, words = run_shape(table.bits[g])
        run_lo, run_hi = int(local.min()) // per_run, int(local.max()) // per_run + 1
        spans.append((g, mine, local - run_lo * per_run, table.qrow[g] + run_lo * words,
                      min(table.qrow[g] + run_hi * words, table.qrow_stop(g))))
    for first, rows, block in _read_spans(weights, name, spans, n_ranges):
        for g, mine, local, start, stop in block:
            shift = (1 << (width - 1)) - (1 << (table.bits[g] - 1))  # zero point 2^(b-1) -> 2^(width-1)
            codes[mine] = decode_rows(rows[start - first: stop - first], table.bits[g])[local] + shift
    return codes


def _read_spans(weights: TensorSource, name: str, spans: list, n_ranges: list[tuple[int, int]]):
    """Merge spans of q_weight rows that touch or overlap; for each merged block yield (its first
    row, the rows read [w, n_local] box by box over the N ranges, the spans in it)."""
    blocks: list[list] = []
    for span in sorted(spans, key=lambda s: s[3]):
        if blocks and span[3] <= max(s[4] for s in blocks[-1]):
            blocks[-1].append(span)
        else:
            blocks.append([span])
    for block in blocks:
        first, stop = block[0][3], max(s[4] for s in block)
        rows = torch.cat([weights.read(name, (slice(first, stop), slice(a, b))) for a, b in n_ranges], 1)
        yield first, rows, block


def _read_scales(weights: TensorSource, name: str, g0: int, g1: int, a: int, b: int,
                 q_scale_max: torch.Tensor) -> torch.Tensor:
    """Scales [g1 - g0, b - a] of columns [a, b): the 4-bit words covering them, unpacked and cut."""
    per_word = 32 // SCALE_BITS
    w0, w1 = a // per_word, -(-b // per_word)
    words = weights.read(name, (slice(g0, g1), slice(w0, w1)))
    return scales_from(words, q_scale_max, (w1 - w0) * per_word)[:, a - w0 * per_word: b - w0 * per_word]

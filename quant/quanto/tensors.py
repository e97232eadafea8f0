"""A quanto layer's stored tensors, and the rows / columns a rank takes of them.

Per layer `{p}` (optimum-quanto 0.2, `weight` a WeightQBytesTensor or WeightQBitsTensor):
- qint8 / qfloat8: `{p}.weight._data` int8 / float8 [N, K], `{p}.weight._scale` [N, 1]; w = scale * data.
- qint4 / qint2: `{p}.weight._data._data` uint8 [ceil(G / v), gs] (v = 8 / bits codes a byte),
  `{p}.weight._scale` and `{p}.weight._shift` [G, 1]. The weight is grouped as [G, gs] = [N * K/gs, gs]
  (group g: row g // (K/gs), columns (g % (K/gs)) * gs ...); gs is not stored (128, less 32 until it
  divides K; per-channel, gs = K, for K <= 128), so it is G's complement: gs = N*K / G. Packing
  splits the G rows into v runs of R = ceil(G / v): byte [r, c] holds group row i*R + r in bits
  [i*bits, (i+1)*bits) (run 0 in the low bits). A float shift gives w = scale * q - shift, an
  integer (uint8 zero point) one w = scale * (q - shift).
`{p}.input_scale` / `output_scale` belong to activation quantization, which qshard does not run.
"""

from __future__ import annotations

import torch

from parallel.sharding import LinearShard, TensorSource, tensor_name
from quant.base import QuantConfigError


def read_stored(weights: TensorSource, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
    """A tensor in its stored dtype (a plain read casts floats to the engine's dtype)."""
    dtype = weights.get_dtype(name)
    if dtype.is_floating_point and dtype != weights.dtype:
        return weights.read(name, index, raw=True)
    return weights.read(name, index)


def need(weights: TensorSource, name: str, qtype: str) -> str:
    if not weights.has(name):
        raise QuantConfigError(f"tensor {name} is missing from the quanto checkpoint (a {qtype} weight needs it)")
    return name


def row_blocks(shard: LinearShard, src: str) -> list[tuple[int, int]]:
    """The rank's row ranges of the tensors stored under `src`."""
    return [(b.offset + b.start, b.offset + b.stop) for b in shard.blocks if b.source == src]


def grouped_codes(weights: TensorSource, name: str, bits: int, groups: int, gs: int, g0: int, g1: int) -> torch.Tensor:
    """uint8 [g1 - g0, gs]: codes of group rows [g0, g1), reading only the packed rows that hold them."""
    per_byte = 8 // bits
    runs = -(-groups // per_byte)
    shape = list(weights.get_shape(name))
    if shape != [runs, gs] or weights.get_dtype(name) != torch.uint8:
        raise QuantConfigError(f"tensor {name} is {weights.get_dtype(name)} {shape}; {groups} groups of {gs} "
                               f"{bits}-bit codes are stored as uint8 [{runs}, {gs}]")
    out = torch.empty(g1 - g0, gs, dtype=torch.uint8)
    for i in range(per_byte):
        lo, hi = max(g0, i * runs), min(g1, (i + 1) * runs)
        if lo >= hi:
            continue
        packed = weights.read(name, (slice(lo - i * runs, hi - i * runs), slice(None)))
        out[lo - g0: hi - g0] = (packed >> (bits * i)) & ((1 << bits) - 1)
    return out


def group_size(weights: TensorSource, scale_name: str, n: int, k: int) -> int:
    shape = list(weights.get_shape(scale_name))
    if len(shape) != 2 or shape[1] != 1 or shape[0] <= 0 or (n * k) % shape[0]:
        raise QuantConfigError(f"tensor {scale_name} has shape {shape}; expected [groups, 1] with groups dividing "
                               f"{n}x{k}")
    gs = n * k // shape[0]
    if k % gs:
        raise QuantConfigError(f"tensor {scale_name}: {shape[0]} groups give group size {gs}, which does not "
                               f"divide in_features {k}")
    return gs


def sub_bytes_part(weights: TensorSource, src: str, shard: LinearShard, bits: int, qtype: str):
    """(codes uint8 [N_loc, K_loc], scale [N_loc, Gk], shift [N_loc, Gk], first group column, gs): the
    rank's part of a qint4/qint2 layer, Gk groups per row covering its K range."""
    data = need(weights, tensor_name(src, "weight._data._data"), qtype)
    scale_name = need(weights, tensor_name(src, "weight._scale"), qtype)
    shift_name = need(weights, tensor_name(src, "weight._shift"), qtype)
    n_src = max(bl.offset + bl.size for bl in shard.blocks if bl.source == src)
    K = shard.in_features
    gs = group_size(weights, scale_name, n_src, K)
    per_row = K // gs
    groups = n_src * per_row
    if list(weights.get_shape(shift_name)) != [groups, 1]:
        raise QuantConfigError(f"tensor {shift_name} has shape {weights.get_shape(shift_name)}, expected [{groups}, 1]")
    j0, j1 = shard.k_start // gs, -(-shard.k_stop // gs)
    codes, scales, shifts = [], [], []
    for r0, r1 in row_blocks(shard, src):
        g0, g1 = r0 * per_row, r1 * per_row
        c = grouped_codes(weights, data, bits, groups, gs, g0, g1).reshape(r1 - r0, K)
        codes.append(c[:, shard.k_start: shard.k_stop])
        scales.append(read_stored(weights, scale_name, (slice(g0, g1), slice(None))).reshape(r1 - r0, per_row)[:, j0:j1])
        shifts.append(read_stored(weights, shift_name, (slice(g0, g1), slice(None))).reshape(r1 - r0, per_row)[:, j0:j1])
    return torch.cat(codes), torch.cat(scales), torch.cat(shifts), j0, gs

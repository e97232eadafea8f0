"""Which part of each stored tensor a tensor-parallel rank takes, written once as data.

A linear layer y = x W^T has logical axes N (out-features) and K (in-features); quantized formats
add G (quantization groups along K). Every stored tensor of a layer is described by a `Role`: which
logical axis each of its dims runs along, and which dim (if any) packs b-bit codes into int32
words. A `LinearShard` says what one rank owns: its blocks of N (several for fused QKV / gate_up,
with KV heads replicated when TP exceeds them) and its range of K. `CUTS` below maps
(layout, axis) to the cut a rank makes along that axis; `read_shard` applies it to any role.

Consequences worth naming:
- Packed dims are sliced in stored words when the range lines up with whole words, and otherwise
  unpacked, sliced and re-packed (zero-padded at the end): any TP size loads, none is refused
  for packing alignment.
- Groups on a row-parallel layer: a rank takes the groups that cover its K range, so a group that
  straddles two ranks is replicated on both. With act-order (g_idx a permutation of groups) the
  rank keeps the whole group table and its g_idx stays absolute.
- g_idx on a row-parallel layer without act-order is rebased to the rank's first group.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import torch

from kernels.packing import pack_int32, packed_size, run_shape, unpack_int32
from kernels.errors import QShardError


class Layout(enum.Enum):
    REPLICATED = "replicated"
    COLUMN = "column"  # split N, the output features
    ROW = "row"  # split K, the input features (outputs summed by all-reduce)


class Axis(enum.Enum):
    N = "out-features"
    K = "in-features"
    G = "groups"
    FULL = "unsplit"  # never split (scalar scales, shape records)


class Cut(enum.Enum):
    WHOLE = "whole"
    OUT_BLOCKS = "the rank's block(s) of N"
    IN_RANGE = "the rank's range of K"
    COVERING_GROUPS = "the groups covering the rank's range of K"


# The sharding rules. Act-order turns COVERING_GROUPS into WHOLE (see `_cut`).
CUTS: dict[tuple[Layout, Axis], Cut] = {
    (Layout.REPLICATED, Axis.N): Cut.WHOLE,
    (Layout.REPLICATED, Axis.K): Cut.WHOLE,
    (Layout.REPLICATED, Axis.G): Cut.WHOLE,
    (Layout.REPLICATED, Axis.FULL): Cut.WHOLE,
    (Layout.COLUMN, Axis.N): Cut.OUT_BLOCKS,
    (Layout.COLUMN, Axis.K): Cut.WHOLE,
    (Layout.COLUMN, Axis.G): Cut.WHOLE,
    (Layout.COLUMN, Axis.FULL): Cut.WHOLE,
    (Layout.ROW, Axis.N): Cut.WHOLE,
    (Layout.ROW, Axis.K): Cut.IN_RANGE,
    (Layout.ROW, Axis.G): Cut.COVERING_GROUPS,
    (Layout.ROW, Axis.FULL): Cut.WHOLE,
}


class TensorSource(Protocol):
    """What sharding needs from a checkpoint (engine.weights.Weights implements it). Floats read
    come back in `dtype` (float8 kept), every tensor on `device`."""

    dtype: torch.dtype
    device: torch.device

    def has(self, name: str) -> bool: ...
    def get_shape(self, name: str) -> list[int]: ...
    def get_dtype(self, name: str) -> torch.dtype: ...
    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor: ...


class ShardingError(QShardError, ValueError):
    """A tensor or layer cannot be split as asked; the message names it."""


@dataclass(frozen=True)
class Role:
    """How one stored tensor of a linear layer maps onto the layer's logical axes."""

    suffix: str  # tensor name after the layer prefix, e.g. "qweight"
    axes: tuple[Axis, ...]
    packed_dim: int | None = None  # dim holding int32 words of packed codes
    bits: int | None = None  # code width on packed_dim
    order: tuple[int, ...] | None = None  # in-word code order (AWQ)
    group_ids: bool = False  # values are group indices along K (g_idx)

    def dim_of(self, axis: Axis) -> int | None:
        return self.axes.index(axis) if axis in self.axes else None

    def with_bits(self, bits: int) -> "Role":
        return replace(self, bits=bits)


@dataclass(frozen=True)
class Groups:
    """Quantization groups along K. size -1 means one group spanning all of K."""

    size: int
    act_order: bool = False

    def size_for(self, in_features: int) -> int:
        return in_features if self.size == -1 else self.size

    def count(self, in_features: int) -> int:
        g = self.size_for(in_features)
        return -(-in_features // g)


@dataclass(frozen=True)
class Block:
    """One logical output block of a layer (q, k or v of a fused QKV; gate or up; or the whole N).

    `source` is the tensor-name prefix the block is stored under and `offset` where the block
    starts along N inside that source's tensors (non-zero when several blocks share one tensor).
    [start, stop) is the rank's part, relative to the block.
    """

    source: str
    offset: int
    size: int
    start: int
    stop: int

    @property
    def local_size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class LinearShard:
    """What one rank owns of a (possibly fused) linear layer."""

    layout: Layout
    in_features: int
    blocks: tuple[Block, ...]
    k_start: int
    k_stop: int
    rank: int = 0
    world_size: int = 1

    @property
    def out_features(self) -> int:
        return sum(b.size for b in self.blocks)

    @property
    def local_out_features(self) -> int:
        return sum(b.local_size for b in self.blocks)

    @property
    def local_in_features(self) -> int:
        return self.k_stop - self.k_start

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.source for b in self.blocks))

    @property
    def prefix(self) -> str:
        return self.sources[0]

    def block_sizes(self, local: bool = True) -> list[int]:
        return [b.local_size if local else b.size for b in self.blocks]


# ---------------------------------------------------------------------------------------------
# Building a rank's shard of each layer kind


def split_evenly(size: int, world_size: int, rank: int, what: str) -> tuple[int, int]:
    if size % world_size:
        raise ShardingError(f"{what} = {size} is not divisible by the tensor-parallel size {world_size}")
    part = size // world_size
    return rank * part, (rank + 1) * part


def replicated_shard(source: str, in_features: int, out_features: int) -> LinearShard:
    return LinearShard(Layout.REPLICATED, in_features, (Block(source, 0, out_features, 0, out_features),),
                       0, in_features)


def column_shard(parts: Sequence[tuple[str, int]], in_features: int, rank: int, world_size: int,
                 offsets: Sequence[int] | None = None) -> LinearShard:
    """Column-parallel layer made of blocks [(source, size), ...] (one block for a plain layer,
    several for a merged one such as gate_up); every block is split evenly across ranks."""
    blocks = []
    for i, (source, size) in enumerate(parts):
        start, stop = split_evenly(size, world_size, rank, f"out-features of {source}")
        blocks.append(Block(source, offsets[i] if offsets else 0, size, start, stop))
    return LinearShard(Layout.COLUMN, in_features, tuple(blocks), 0, in_features, rank, world_size)


def qkv_shard(sources: Sequence[str], in_features: int, num_heads: int, num_kv_heads: int,
              head_dim: int, rank: int, world_size: int, fused: bool = False) -> LinearShard:
    """Fused QKV: query heads split evenly; KV heads split evenly when TP <= KV heads, otherwise
    each KV head is replicated on TP / KV-heads consecutive ranks (rank r holds KV head r // that).

    `sources` is (q, k, v) prefixes, or one prefix when the checkpoint stores qkv fused (`fused`)."""
    check_heads(num_heads, num_kv_heads, world_size)
    q_local = num_heads // world_size
    if world_size <= num_kv_heads:
        kv_local, kv_first = num_kv_heads // world_size, rank * (num_kv_heads // world_size)
    else:
        kv_local, kv_first = 1, rank // (world_size // num_kv_heads)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    if fused:
        (src,) = sources
        srcs, offsets = (src, src, src), (0, q_size, q_size + kv_size)
    else:
        srcs, offsets = tuple(sources), (0, 0, 0)
    blocks = (
        Block(srcs[0], offsets[0], q_size, rank * q_local * head_dim, (rank + 1) * q_local * head_dim),
        Block(srcs[1], offsets[1], kv_size, kv_first * head_dim, (kv_first + kv_local) * head_dim),
        Block(srcs[2], offsets[2], kv_size, kv_first * head_dim, (kv_first + kv_local) * head_dim),
    )
    return LinearShard(Layout.COLUMN, in_features, blocks, 0, in_features, rank, world_size)


def check_heads(num_heads: int, num_kv_heads: int, world_size: int) -> None:
    if num_heads % world_size:
        raise ShardingError(
            f"tensor-parallel size {world_size} does not divide num_attention_heads = {num_heads}")
    if num_heads % num_kv_heads:
        raise ShardingError(f"num_attention_heads = {num_heads} is not a multiple of "
                            f"num_key_value_heads = {num_kv_heads}")
    if world_size <= num_kv_heads:
        if num_kv_heads % world_size:
            raise ShardingError(f"tensor-parallel size {world_size} does not divide "
                                f"num_key_value_heads = {num_kv_heads}")
    elif world_size % num_kv_heads:
        raise ShardingError(f"tensor-parallel size {world_size} exceeds num_key_value_heads = "
                            f"{num_kv_heads} and is not a multiple of it (KV heads cannot be replicated evenly)")


def row_shard(source: str, in_features: int, out_features: int, rank: int, world_size: int,
              unit: int = 1) -> LinearShard:
    """Row-parallel layer: K split evenly in multiples of `unit` (head_dim for o_proj)."""
    if in_features % unit:
        raise ShardingError(f"in-features of {source} = {in_features} is not a multiple of {unit}")
    start, stop = split_evenly(in_features // unit, world_size, rank, f"in-features of {source} / {unit}")
    return LinearShard(Layout.ROW, in_features, (Block(source, 0, out_features, 0, out_features),),
                       start * unit, stop * unit, rank, world_size)


# ---------------------------------------------------------------------------------------------
# Applying the rules to one stored tensor


def _cut(layout: Layout, axis: Axis, groups: Groups | None) -> Cut:
    cut = CUTS[(layout, axis)]
    if cut is Cut.COVERING_GROUPS and groups is not None and groups.act_order:
        return Cut.WHOLE
    return cut


def logical_ranges(shard: LinearShard, axis: Axis, groups: Groups | None,
                   source: str | None = None) -> list[tuple[int, int]]:
    """Index ranges (logical units, before packing) that the rank takes along `axis`,
    restricted to the blocks stored under `source` for the N axis."""
    cut = _cut(shard.layout, axis, groups)
    if cut is Cut.OUT_BLOCKS:
        return [(b.offset + b.start, b.offset + b.stop) for b in shard.blocks
                if source is None or b.source == source]
    if cut is Cut.IN_RANGE:
        return [(shard.k_start, shard.k_stop)]
    if cut is Cut.COVERING_GROUPS:
        g = _need_groups(groups, shard).size_for(shard.in_features)
        return [(shard.k_start // g, -(-shard.k_stop // g))]
    return [(0, logical_length(shard, axis, groups, source))]


def logical_length(shard: LinearShard, axis: Axis, groups: Groups | None, source: str | None = None) -> int:
    """Full logical length of `axis` in the tensors stored under `source`."""
    if axis is Axis.N:
        if source is None:
            return shard.out_features
        # A source holding several blocks (fused qkv) spans up to its last block's end.
        return max(b.offset + b.size for b in shard.blocks if b.source == source)
    if axis is Axis.K:
        return shard.in_features
    if axis is Axis.G:
        return _need_groups(groups, shard).count(shard.in_features)
    raise ShardingError(f"axis {axis} has no logical length")


def _need_groups(groups: Groups | None, shard: LinearShard) -> Groups:
    if groups is None:
        raise ShardingError(f"{shard.prefix}: a tensor has a group axis but the layer has no group size")
    return groups


def expected_shape(role: Role, shard: LinearShard, groups: Groups | None, source: str) -> list[int | None]:
    """The stored shape the full tensor must have (None for FULL axes, which are not checked)."""
    shape: list[int | None] = []
    for d, axis in enumerate(role.axes):
        if axis is Axis.FULL:
            shape.append(None)
            continue
        n = logical_length(shard, axis, groups, source)
        shape.append(packed_size(n, role.bits) if d == role.packed_dim else n)
    return shape


def read_shard(source: TensorSource, role: Role, shard: LinearShard, groups: Groups | None = None) -> torch.Tensor:
    """The rank's part of tensor `{block source}.{role.suffix}`, in stored form (packed stays packed).

    Blocks from several sources are concatenated along N. A role without an N axis must be the
    same in every source (g_idx of q/k/v, say); it is read once from each and compared.
    """
    n_dim = role.dim_of(Axis.N)
    parts = []
    for src in shard.sources:
        name = tensor_name(src, role.suffix)
        parts.append(_read_one(source, name, role, shard, groups, src))
        if n_dim is None and len(parts) > 1 and not torch.equal(parts[0], parts[-1]):
            raise ShardingError(f"{name} differs from {tensor_name(shard.sources[0], role.suffix)}; fused layers "
                                f"{list(shard.sources)} must share it")
    if n_dim is None or len(parts) == 1:
        return parts[0]
    if role.packed_dim == n_dim:
        codes = [unpack_int32(p, role.bits, n_dim, count=n, order=role.order)
                 for p, n in zip(parts, _local_counts(shard))]
        return pack_int32(torch.cat(codes, n_dim), role.bits, n_dim, role.order)
    return torch.cat(parts, n_dim)


def tensor_name(prefix: str, suffix: str) -> str:
    return f"{prefix}.{suffix}" if prefix else suffix


def _local_counts(shard: LinearShard) -> list[int]:
    return [sum(b.local_size for b in shard.blocks if b.source == s) for s in shard.sources]


def _read_one(source: TensorSource, name: str, role: Role, shard: LinearShard, groups: Groups | None,
              src: str) -> torch.Tensor:
    if not source.has(name):
        raise ShardingError(f"tensor {name} is missing from the checkpoint")
    shape = source.get_shape(name)
    want = expected_shape(role, shard, groups, src)
    if len(shape) != len(want) or any(w is not None and s != w for s, w in zip(shape, want)):
        shown = ["*" if w is None else w for w in want]
        raise ShardingError(f"tensor {name} has shape {list(shape)}, expected {shown} "
                            f"(in_features={shard.in_features}, out_features={logical_length(shard, Axis.N, groups, src)}"
                            + (f", group_size={groups.size}" if groups else "") + ")")
    full = [shape[d] if axis is Axis.FULL else logical_length(shard, axis, groups, src)
            for d, axis in enumerate(role.axes)]
    ranges = [[(0, shape[d])] if axis is Axis.FULL else logical_ranges(shard, axis, groups, src)
              for d, axis in enumerate(role.axes)]
    # Only N can take several ranges (blocks of a fused tensor): read each box on its own so
    # that a rank never reads the gaps between its blocks.
    split = next((d for d, rs in enumerate(ranges) if len(rs) > 1), None)
    boxes = ([[rs[0] for rs in ranges]] if split is None else
             [[r if d == split else rs[0] for d, rs in enumerate(ranges)] for r in ranges[split]])
    pieces = [_read_box(source, name, role, box, full) for box in boxes]
    if len(pieces) == 1:
        t = pieces[0]
    elif split == role.packed_dim:
        codes = [unpack_int32(p, role.bits, split, count=b - a, order=role.order)
                 for p, (a, b) in zip(pieces, ranges[split])]
        t = pack_int32(torch.cat(codes, split), role.bits, split, role.order)
    else:
        t = torch.cat(pieces, split)
    if role.group_ids:
        t = _shard_group_ids(t, name, shard, groups)
    return t


def _read_box(source: TensorSource, name: str, role: Role, box: list[tuple[int, int]],
              full: list[int]) -> torch.Tensor:
    """Read logical ranges `box` (one per dim). A packed dim is read in whole words; when the
    range does not start and end on word-run boundaries the codes are re-packed from zero."""
    index = [slice(a, b) for a, b in box]
    d = role.packed_dim
    if d is None:
        return source.read(name, tuple(index))
    codes, words = run_shape(role.bits)
    a, b = box[d]
    index[d] = slice(a // codes * words, -(-b // codes) * words)
    t = source.read(name, tuple(index))
    if a % codes == 0 and (b % codes == 0 or b == full[d]):
        return t
    base = a // codes * codes
    values = unpack_int32(t, role.bits, d, order=role.order).narrow(d, a - base, b - a)
    return pack_int32(values, role.bits, d, role.order)


def _shard_group_ids(g_idx: torch.Tensor, name: str, shard: LinearShard, groups: Groups | None) -> torch.Tensor:
    """Row-parallel g_idx: absolute under act-order (the group table stays whole), otherwise
    rebased to the first group the rank holds."""
    groups = _need_groups(groups, shard)
    n_groups = groups.count(shard.in_features)
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise ShardingError(f"tensor {name} holds group ids in [{int(g_idx.min())}, {int(g_idx.max())}], "
                            f"outside [0, {n_groups}) for in_features={shard.in_features}, group_size={groups.size}")
    if _cut(shard.layout, Axis.G, groups) is Cut.COVERING_GROUPS:
        g_idx = g_idx - shard.k_start // groups.size_for(shard.in_features)
    return g_idx.to(torch.int32)


def trivial_group_ids(in_features: int, groups: Groups) -> torch.Tensor:
    """g_idx of a checkpoint without act-order: k // group_size."""
    return (torch.arange(in_features, dtype=torch.int32) // groups.size_for(in_features)).to(torch.int32)


def local_group_ids(shard: LinearShard, groups: Groups) -> torch.Tensor:
    """The rank's g_idx for a layer stored without one (no act-order): rebased k // group_size."""
    g = groups.size_for(shard.in_features)
    k = torch.arange(shard.k_start, shard.k_stop, dtype=torch.int32)
    if _cut(shard.layout, Axis.G, groups) is Cut.COVERING_GROUPS:
        return (k // g - shard.k_start // g).to(torch.int32)
    return (k // g).to(torch.int32)

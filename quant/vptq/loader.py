"""VPTQ loader: each rank reads the vector rows (column-parallel) or the column groups
(row-parallel) it needs, unpacks their index streams, and builds a kernels.CodebookLayout block
per stored part: an outlier part (vector length ovl, one codebook) and a main part (vector length
vl, centroids + residual as two codebooks per column group), then perm and norm."""

from __future__ import annotations

from typing import Any

import torch

from kernels.layouts import CodebookBlock, CodebookLayout, CodebookPart
from parallel.sharding import Block, LinearShard, TensorSource, tensor_name
from quant.base import KernelLinear, PackedLinear, QuantConfigError, WeightsLoader, register
from quant.common.packed_layers import dense_if_unquantized
from quant.vptq.bitstream import unpack_entries
from quant.vptq.config import METHOD, VptqLayer, VptqParams


def _read(weights: TensorSource, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
    """Stored dtype where the source can: float16-held indices are bit patterns, not numbers."""
    try:
        return weights.read(name, index, raw=True)
    except TypeError:  # a TensorSource without raw reads: fine unless floats hold bit patterns
        t = weights.read(name, index)
        if t.dtype != weights.get_dtype(name):
            raise QuantConfigError(f"tensor {name} is stored as {weights.get_dtype(name)} and this weight source "
                                   f"cannot read it unconverted (VPTQ float16-held indices are bit patterns)") from None
        return t


def _as_uint16(t: torch.Tensor, name: str) -> torch.Tensor:
    """16-bit indices / perm stored as int16 or float16 bit patterns (VPTQ's uint16 views) → int64."""
    if t.element_size() != 2:
        if not t.is_floating_point():
            return t.to(torch.int64)  # unpacked perm may be int64
        raise QuantConfigError(f"tensor {name} has dtype {t.dtype}; VPTQ stores 16-bit indices")
    return t.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


class _Tensors:
    """One layer's tensor names and shape checks (each error names the tensor and the fields)."""

    def __init__(self, weights: TensorSource, src: str, layer: VptqLayer, n: int, k: int):
        self.weights, self.src, self.layer, self.n, self.k = weights, src, layer, n, k

    def name(self, suffix: str) -> str:
        return tensor_name(self.src, suffix)

    def shape(self, suffix: str, want: list[int], why: str) -> str:
        name = self.name(suffix)
        if not self.weights.has(name):
            raise QuantConfigError(f"tensor {name} is missing from the vptq checkpoint ({why})")
        got = list(self.weights.get_shape(name))
        if got != want:
            raise QuantConfigError(f"tensor {name} has shape {got}, expected {want} ({why}; layer {self.src}: "
                                   f"out_features={self.n}, in_features={self.k})")
        return name


@register(METHOD)
class VptqLoader(WeightsLoader):
    method = METHOD

    def __init__(self, params: VptqParams):
        self.params = params

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "VptqLoader":
        return cls(VptqParams.parse(config))

    def describe(self) -> str:
        return f"vptq({len(self.params.layers)} layer configs, {len(self.params.shared)} shared)"

    def load_linear(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        dense = dense_if_unquantized(weights, shard, "indices", self.method)
        if dense is not None:
            return dense
        blocks = tuple(self._block(weights, shard, b) for b in shard.blocks)
        return KernelLinear(CodebookLayout(blocks), weights.dtype)

    def _layer(self, src: str) -> VptqLayer:
        layer = self.params.layer(src)
        if layer is None:
            raise QuantConfigError(f"vptq quantization_config has no entry for layer {src} (config_for_layers by "
                                   f"module name, or shared_layer_config by '{src.split('.')[-1]}')")
        return layer

    def _block(self, weights: TensorSource, shard: LinearShard, block: Block) -> CodebookBlock:
        src = block.source
        layer = self._layer(src)
        K = shard.in_features
        n_src = max(b.offset + b.size for b in shard.blocks if b.source == src)
        t = _Tensors(weights, src, layer, n_src, K)
        O = layer.outlier_cols
        if O + layer.group_num * layer.group_size != K:
            raise QuantConfigError(f"vptq layer {src}: outlier_size {O} + group_num {layer.group_num} x group_size "
                                   f"{layer.group_size} = {O + layer.group_num * layer.group_size} columns, but "
                                   f"in_features is {K}")
        k0, k1 = shard.k_start, shard.k_stop
        perm = self._perm(t, K) if layer.enable_perm else None
        j0, local_perm = self._internal_range(src, shard, perm)
        j1 = j0 + (k1 - k0)
        rows = (block.offset + block.start, block.offset + block.stop)
        parts = []
        if j0 < O:
            parts.append(self._outlier_part(t, rows, j0, min(j1, O)))
        if j1 > O:
            parts.append(self._main_part(t, rows, max(j0, O) - O, j1 - O))
        scale = bias = None
        if layer.enable_norm:
            scale = _read(weights, t.shape("weight_scale", [K], "enable_norm"), (slice(k0, k1),)).float()
            bias = _read(weights, t.shape("weight_bias", [K], "enable_norm"), (slice(k0, k1),)).float()
        return CodebookBlock(tuple(parts), local_perm, scale, bias)

    # -- which internal columns the rank needs --------------------------------------------------

    @staticmethod
    def _perm(t: _Tensors, K: int) -> torch.Tensor:
        name = t.shape("perm", [K], "enable_perm")
        perm = _as_uint16(_read(t.weights, name), name)
        if not torch.equal(torch.sort(perm).values, torch.arange(K)):
            raise QuantConfigError(f"tensor {name} is not a permutation of the {K} in-features")
        return perm

    @staticmethod
    def _internal_range(src: str, shard: LinearShard, perm: torch.Tensor | None) -> tuple[int, torch.Tensor | None]:
        """(first internal column, the rank's perm over its columns or None): internal column j0 + j
        is the rank's in-feature local_perm[j]."""
        k0, k1 = shard.k_start, shard.k_stop
        if perm is None:
            return k0, None
        inverse = torch.argsort(perm)  # in-feature k sits at internal column inverse[k]
        mine = inverse[k0:k1]
        j0, j1 = int(mine.min()), int(mine.max()) + 1
        if j1 - j0 != k1 - k0:
            raise QuantConfigError(
                f"vptq layer {src}: cannot split its in-features across {shard.world_size} ranks: enable_perm=true "
                f"and its perm sends rank {shard.rank}'s in-features [{k0}, {k1}) to internal columns spread over "
                f"[{j0}, {j1}) (not one contiguous range), so the rank would need the whole layer's indices. Load "
                f"it at a tensor-parallel size that keeps whole permutation blocks per rank, or a checkpoint "
                f"without perm (or with perm absorbed into the previous layer)")
        local = perm[j0:j1] - k0
        return j0, (None if torch.equal(local, torch.arange(k1 - k0)) else local)

    # -- the two parts -------------------------------------------------------------------------

    @staticmethod
    def _vector_rows(rows: tuple[int, int], vl: int) -> tuple[int, int, int]:
        a, b = rows
        return a // vl, -(-b // vl), a - a // vl * vl

    def _outlier_part(self, t: _Tensors, rows, c0: int, c1: int) -> CodebookPart:
        layer = t.layer
        ovl, n_out, O = layer.outlier_vector_len, layer.num_outlier_centroids, layer.outlier_size
        books_name = t.shape("outlier_centroids.weight", [1, n_out * ovl], "outlier codebook")
        idx_name = t.shape("outlier_indices", [1, -(-t.n // ovl), O], "outlier indices")
        v0, v1, skip = self._vector_rows(rows, ovl)
        idx = _as_uint16(_read(t.weights, idx_name, (slice(0, 1), slice(v0, v1), slice(c0, c1))), idx_name)[0]
        self._check_range(idx, n_out, idx_name)
        books = _read(t.weights, books_name).float().reshape(1, 1, n_out, ovl, 1)
        return CodebookPart(idx.to(torch.int32)[..., None].contiguous(), books, None, O, c0, skip,
                            rows[1] - rows[0], c1 - c0)

    def _main_part(self, t: _Tensors, rows, m0: int, m1: int) -> CodebookPart:
        """Main columns [m0, m1) (relative to the first main column)."""
        layer = t.layer
        vl, n, r, G, gs = layer.vector_len, layer.num_centroids, layer.num_res_centroids, layer.group_num, \
            layer.group_size
        g0, g1 = m0 // gs, -(-m1 // gs)
        v0, v1, skip = self._vector_rows(rows, vl)
        num_vec = -(-t.n // vl)
        books_name = t.shape("centroids.weight", [G, n * vl], "main codebook")
        cent = _read(t.weights, books_name, (slice(g0, g1), slice(0, n * vl))).float().reshape(g1 - g0, n, vl)
        tables = [cent]
        if layer.is_indice_packed:
            words = -(-gs * (layer.index_bits + layer.res_bits) // 32)
            idx_name = t.shape("indices", [G, num_vec, words], "packed indices: ceil(group_size x index bits / 32)")
            if t.weights.get_dtype(idx_name) != torch.int32:
                raise QuantConfigError(f"tensor {idx_name} has dtype {t.weights.get_dtype(idx_name)}; packed VPTQ "
                                       f"indices (is_indice_packed=true) are int32")
            packed = t.weights.read(idx_name, (slice(g0, g1), slice(v0, v1), slice(0, words)))
            entries = unpack_entries(packed, layer.index_bits + layer.res_bits, gs)
            idx = entries & ((1 << layer.index_bits) - 1)
            ridx = entries >> layer.index_bits if layer.has_residual else None
        else:
            idx_name = t.shape("indices", [G, num_vec, gs], "indices (is_indice_packed=false)")
            box = (slice(g0, g1), slice(v0, v1), slice(0, gs))
            idx = _as_uint16(_read(t.weights, idx_name, box), idx_name)
            ridx = None
            if layer.has_residual:
                res_name = t.shape("res_indices", [G, num_vec, gs], "residual indices (is_indice_packed=false)")
                ridx = _as_uint16(_read(t.weights, res_name, box), res_name)
        self._check_range(idx, n, idx_name)
        codes = [idx]
        if layer.has_residual:
            res_name = t.shape("res_centroids.weight", [G, r * vl], "residual codebook")
            tables.append(_read(t.weights, res_name, (slice(g0, g1), slice(0, r * vl))).float().reshape(g1 - g0, r, vl))
            self._check_range(ridx, r, idx_name)
            codes.append(ridx)
        # [groups, vector rows, gs] per codebook → [vector rows, columns, C], the rank's columns
        first = m0 - g0 * gs
        codes = torch.stack([c.permute(1, 0, 2).reshape(v1 - v0, -1)[:, first: first + m1 - m0] for c in codes], -1)
        E = max(tb.shape[1] for tb in tables)  # the residual table zero-padded to the main one's size
        books = torch.zeros(g1 - g0, len(tables), E, vl, 1)
        for c, tb in enumerate(tables):
            books[:, c, : tb.shape[1], :, 0] = tb
        return CodebookPart(codes.to(torch.int32).contiguous(), books, None, gs, first, skip, rows[1] - rows[0],
                            m1 - m0)

    @staticmethod
    def _check_range(idx: torch.Tensor, count: int, name: str) -> None:
        if idx.numel() and int(idx.max()) >= count:
            raise QuantConfigError(f"tensor {name} holds index {int(idx.max())}, outside the {count} centroids")

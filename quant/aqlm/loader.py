"""AQLM loader: each rank reads its out-groups (column-parallel) or in-groups (row-parallel) of
the codes and scales, and the whole codebooks; the layer becomes a kernels.CodebookLayout with
one block per stored part (fused q/k/v or gate/up keep their own codebooks)."""

from __future__ import annotations

from typing import Any

import torch

from kernels.layouts import CodebookBlock, CodebookLayout, CodebookPart
from parallel.sharding import Block, LinearShard, TensorSource, tensor_name
from quant.aqlm.config import METHOD, AqlmParams
from quant.base import KernelLinear, PackedLinear, QuantConfigError, WeightsLoader, register
from quant.common.packed_layers import dense_if_unquantized

CODE_DTYPES = {8: (torch.int8, torch.uint8, torch.int16, torch.int32), 16: (torch.int16, torch.int32)}


def read_raw(weights: TensorSource, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
    """A tensor in its stored dtype where the source can (fp16 codebooks stay exact under a bf16 model)."""
    try:
        return weights.read(name, index, raw=True)
    except TypeError:  # a TensorSource without raw reads
        return weights.read(name, index)


def _require(weights: TensorSource, name: str, field: str) -> list[int]:
    if not weights.has(name):
        raise QuantConfigError(f"tensor {name} is missing from the aqlm checkpoint (its {field})")
    return list(weights.get_shape(name))


@register(METHOD)
class AqlmLoader(WeightsLoader):
    method = METHOD

    def __init__(self, params: AqlmParams):
        self.params = params

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AqlmLoader":
        return cls(AqlmParams.parse(config))

    def describe(self) -> str:
        p = self.params
        return (f"aqlm({p.num_codebooks}x{p.nbits_per_codebook}, in_group_size={p.in_group_size}, "
                f"out_group_size={p.out_group_size})")

    def load_linear(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        dense = dense_if_unquantized(weights, shard, "codes", self.method)
        if dense is not None:
            return dense
        self._check_row_split(shard)
        blocks = tuple(CodebookBlock((self._part(weights, shard, b),)) for b in shard.blocks)
        return KernelLinear(CodebookLayout(blocks), weights.dtype)

    def _check_row_split(self, shard: LinearShard) -> None:
        ig = self.params.in_group_size
        if shard.in_features % ig:
            raise QuantConfigError(f"aqlm layer {shard.prefix}: in_group_size={ig} does not divide in_features="
                                   f"{shard.in_features}")
        if shard.k_start % ig or shard.k_stop % ig:
            raise QuantConfigError(
                f"aqlm layer {shard.prefix}: rank {shard.rank} of {shard.world_size} takes in-features "
                f"[{shard.k_start}, {shard.k_stop}), which splits in-groups of in_group_size={ig} (in_features "
                f"{shard.in_features} / TP {shard.world_size} = {shard.local_in_features} is not a multiple of "
                f"{ig}); use a tensor-parallel size that keeps whole in-groups per rank")

    def _part(self, weights: TensorSource, shard: LinearShard, block: Block) -> CodebookPart:
        p = self.params
        og, ig, C, E = p.out_group_size, p.in_group_size, p.num_codebooks, p.codebook_size
        src = block.source
        codes_name, books_name, scales_name = (tensor_name(src, s) for s in ("codes", "codebooks", "scales"))
        codes_shape = _require(weights, codes_name, "codes")
        books_shape = _require(weights, books_name, "codebooks (codebooks are per layer, replicated per rank)")
        scales_shape = _require(weights, scales_name, "scales")
        n_src = max(b.offset + b.size for b in shard.blocks if b.source == src)
        K = shard.in_features
        if n_src % og:
            raise QuantConfigError(f"aqlm layer {src}: out_group_size={og} does not divide out_features={n_src}")
        if books_shape != [C, E, og, ig]:
            raise QuantConfigError(
                f"tensor {books_name} has shape {books_shape}, expected [{C}, {E}, {og}, {ig}] (num_codebooks, "
                f"2^nbits_per_codebook, out_group_size, in_group_size from the quantization_config): unsupported "
                f"codebook shape for this config")
        if codes_shape != [n_src // og, K // ig, C]:
            raise QuantConfigError(f"tensor {codes_name} has shape {codes_shape}, expected [{n_src // og}, "
                                   f"{K // ig}, {C}] (out_features / out_group_size, in_features / in_group_size, "
                                   f"num_codebooks)")
        code_dtype = weights.get_dtype(codes_name)
        allowed = CODE_DTYPES[8 if p.nbits_per_codebook <= 8 else 16]
        if code_dtype not in allowed:
            raise QuantConfigError(f"tensor {codes_name} has dtype {code_dtype}; {p.nbits_per_codebook}-bit codes are "
                                   f"stored as {' or '.join(str(d).replace('torch.', '') for d in allowed)}")
        if scales_shape not in ([n_src // og, 1, 1, 1], [n_src // og]):
            raise QuantConfigError(f"tensor {scales_name} has shape {scales_shape}, expected [{n_src // og}, 1, 1, 1]")
        first, stop = block.offset + block.start, block.offset + block.stop
        o0, o1 = first // og, -(-stop // og)
        g0, g1 = shard.k_start // ig, shard.k_stop // ig
        codes = weights.read(codes_name, (slice(o0, o1), slice(g0, g1), slice(0, C)))
        codes = (codes.to(torch.int64) % E).to(torch.int32)  # signed storage of unsigned codes
        scale_index = (slice(o0, o1),) + (slice(0, 1),) * (len(scales_shape) - 1)
        scales = read_raw(weights, scales_name, scale_index).float().reshape(-1)
        books = read_raw(weights, books_name).float()[None]  # one codebook group over all of K
        return CodebookPart(codes.contiguous(), books, scales, shard.local_in_features, 0, first - o0 * og,
                            stop - first, shard.local_in_features)

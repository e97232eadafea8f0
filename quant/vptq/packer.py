"""Writes VPTQ layers (the inverse of quant.vptq.loader) from `VptqCodes`, as transformers'
VPTQ integration reads them: packed int32 index streams, int16 outlier indices and perm, the
codebooks as nn.Embedding weights; the quantization_config lists every layer it wrote. Built
from a quantization_config (`for_config`), it writes random VPTQ weights of the layers it lists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quant.base import Packer, QuantConfigError
from quant.common.random_weights import RandomTensor
from quant.vptq.bitstream import pack_entries
from quant.vptq.config import METHOD, VptqLayer, VptqParams


@dataclass
class VptqCodes:
    """One layer in VPTQ's terms (indices unsigned, int64)."""

    layer: VptqLayer
    out_features: int
    centroids: torch.Tensor  # [G, n, vl]
    indices: torch.Tensor  # [G, ceil(N/vl), gs]
    res_centroids: torch.Tensor | None = None  # [G, r, vl]
    res_indices: torch.Tensor | None = None  # [G, ceil(N/vl), gs]
    outlier_centroids: torch.Tensor | None = None  # [n_out, ovl]
    outlier_indices: torch.Tensor | None = None  # [ceil(N/ovl), O]
    perm: torch.Tensor | None = None  # [K]: internal column j is in-feature perm[j]
    weight_scale: torch.Tensor | None = None  # [K]
    weight_bias: torch.Tensor | None = None  # [K]

    def dequantize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """W [N, K] float32 from the codebooks / norm stored in `dtype`, by VPTQ's formula."""

        def vectors(books: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # [G, Ni, gs] → [Ni*vl, G*gs]
            G, ni, gs = idx.shape
            v = books.to(dtype).float()[torch.arange(G)[:, None, None], idx]  # [G, Ni, gs, vl]
            return v.permute(1, 3, 0, 2).reshape(ni * books.shape[-1], G * gs)

        n = self.out_features
        w = vectors(self.centroids, self.indices)
        if self.res_centroids is not None:
            w = w + vectors(self.res_centroids, self.res_indices)
        w = w[:n]
        if self.outlier_centroids is not None:
            out = vectors(self.outlier_centroids[None], self.outlier_indices[None])[:n]
            w = torch.cat([out, w], 1)
        if self.perm is not None:
            permuted = torch.empty_like(w)
            permuted[:, self.perm] = w
            w = permuted
        if self.weight_scale is not None:
            w = w * self.weight_scale.to(dtype).float() + self.weight_bias.to(dtype).float()
        return w


def uint16_bits(t: torch.Tensor) -> torch.Tensor:
    """Values in [0, 2^16) stored as int16 bit patterns (VPTQ keeps indices and perm as uint16 views)."""
    t = t.to(torch.int64)
    return torch.where(t >= 1 << 15, t - (1 << 16), t).to(torch.int16)


class VptqPacker(Packer):
    method = METHOD

    def __init__(self, packed: bool = True, params: VptqParams | None = None):
        self.packed = packed
        self.params = params  # for_config: the layers random weights follow
        self.layers: dict[str, dict[str, Any]] = {}

    @classmethod
    def for_config(cls, config: dict[str, Any]) -> "VptqPacker":
        params = VptqParams.parse(config)
        every = [*params.layers.values(), *params.shared.values()]
        packed = {layer.is_indice_packed for layer in every}
        if len(packed) > 1:
            raise QuantConfigError("the vptq packer writes every layer's indices one way; the quantization_config "
                                   "mixes is_indice_packed true and false")
        packer = cls(packed.pop() if packed else True, params)
        packer.layers = {name: layer.to_config() for name, layer in params.layers.items()}
        return packer

    def random_tensors(self, prefix: str, out_features: int, in_features: int,
                       weight_std: float) -> dict[str, RandomTensor]:
        """Random packed indices (every entry a valid index: power-of-two codebooks), float16
        centroids (and residual / outlier centroids) uniform so that the sum has `weight_std`, the
        identity perm, scale 1 and bias 0. A layer the config does not list, or leaves float
        (modules_to_not_convert), gets a float weight."""
        n, k = out_features, in_features
        layer = self.params.layer(prefix) if self.params is not None else None
        skipped = self.params is not None and any(prefix == m or prefix.endswith("." + m)
                                                  for m in self.params.not_converted)
        if layer is None or skipped:
            return {f"{prefix}.weight": RandomTensor((n, k), "uniform", weight_std * 3 ** 0.5)}
        L = layer
        if L.outlier_cols + L.group_num * L.group_size != k:
            raise QuantConfigError(f"vptq layer {prefix}: outlier_size {L.outlier_cols} + group_num {L.group_num} x "
                                   f"group_size {L.group_size} != in_features {k}")
        if not L.is_indice_packed:
            raise QuantConfigError(f"random vptq weights are written with packed indices (is_indice_packed=true); "
                                   f"layer {prefix} has is_indice_packed=false")
        for field, count, bits in (("num_centroids", L.num_centroids, L.index_bits),
                                   ("num_res_centroids", L.num_res_centroids, L.res_bits)):
            if bits and count != 1 << bits:
                raise QuantConfigError(f"vptq layer {prefix}: random indices fill whole {bits}-bit fields, so "
                                       f"{field}={count} must be a power of two")
        if L.has_outliers and L.num_outlier_centroids != 1 << 16:
            raise QuantConfigError(f"vptq layer {prefix}: random outlier indices are whole 16-bit words, so "
                                   f"num_centroids[0]={L.num_outlier_centroids} must be 65536")
        books = 2 if L.has_residual else 1
        half = weight_std * (3 / books) ** 0.5  # a sum of `books` uniforms in [-half, half] has weight_std
        words = -(-L.group_size * (L.index_bits + L.res_bits) // 32)
        out = {"centroids.weight": RandomTensor((L.group_num, L.num_centroids * L.vector_len), "uniform", half,
                                                torch.float16),
               "indices": RandomTensor((L.group_num, -(-n // L.vector_len), words), "codes", dtype=torch.int32)}
        if L.has_residual:
            out["res_centroids.weight"] = RandomTensor((L.group_num, L.num_res_centroids * L.vector_len), "uniform",
                                                       half, torch.float16)
        if L.has_outliers:
            ovl = L.outlier_vector_len
            out["outlier_centroids.weight"] = RandomTensor((1, L.num_outlier_centroids * ovl), "uniform",
                                                           weight_std * 3 ** 0.5, torch.float16)
            out["outlier_indices"] = RandomTensor((1, -(-n // ovl), L.outlier_size), "codes", dtype=torch.int16)
        if L.enable_perm:
            out["perm"] = RandomTensor((k,), "group_ids", 1, torch.int16)  # the identity (uint16 bits)
        if L.enable_norm:
            out["weight_scale"] = RandomTensor((k,), "ones", dtype=torch.float16)
            out["weight_bias"] = RandomTensor((k,), "const", 0, torch.float16)
        return {f"{prefix}.{key}": value for key, value in out.items()}

    def pack(self, prefix: str, result: VptqCodes, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        L = result.layer
        if L.is_indice_packed != self.packed:
            raise QuantConfigError(f"{prefix}: codes say is_indice_packed={L.is_indice_packed}, the packer writes "
                                   f"{self.packed}")
        G, n, vl = result.centroids.shape
        if (G, n, vl) != (L.group_num, L.num_centroids, L.vector_len):
            raise QuantConfigError(f"{prefix}: centroids {list(result.centroids.shape)} do not match the layer's "
                                   f"group_num / num_centroids / vector_lens")
        out = {f"{prefix}.centroids.weight": result.centroids.reshape(G, n * vl).to(dtype)}
        if L.has_residual:
            out[f"{prefix}.res_centroids.weight"] = result.res_centroids.reshape(G, -1).to(dtype)
        if self.packed:
            entries = result.indices.to(torch.int64)
            if L.has_residual:
                entries = entries | (result.res_indices.to(torch.int64) << L.index_bits)
            out[f"{prefix}.indices"] = pack_entries(entries, L.index_bits + L.res_bits)
        else:
            out[f"{prefix}.indices"] = uint16_bits(result.indices)
            if L.has_residual:
                out[f"{prefix}.res_indices"] = uint16_bits(result.res_indices)
        if L.has_outliers:
            out[f"{prefix}.outlier_centroids.weight"] = result.outlier_centroids.reshape(1, -1).to(dtype)
            out[f"{prefix}.outlier_indices"] = uint16_bits(result.outlier_indices)[None]
        if L.enable_perm:
            out[f"{prefix}.perm"] = uint16_bits(result.perm)
        if L.enable_norm:
            out[f"{prefix}.weight_scale"] = result.weight_scale.to(dtype)
            out[f"{prefix}.weight_bias"] = result.weight_bias.to(dtype)
        self.layers[prefix] = L.to_config()
        return {k: v.contiguous() for k, v in out.items()}

    def quantization_config(self) -> dict[str, Any]:
        shared = {} if self.params is None else {name: layer.to_config() for name, layer in self.params.shared.items()}
        config = {"quant_method": METHOD, "config_for_layers": dict(self.layers), "shared_layer_config": shared,
                  "enable_proxy_error": False}
        if self.params is not None and self.params.not_converted:
            config["modules_to_not_convert"] = list(self.params.not_converted)
        return config

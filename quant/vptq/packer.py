"""Writes VPTQ layers (the inverse of quant.vptq.loader) from `VptqCodes`, as transformers'
VPTQ integration reads them: packed int32 index streams, int16 outlier indices and perm, the
codebooks as nn.Embedding weights; the quantization_config lists every layer it wrote."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quant.base import Packer, QuantConfigError
from quant.vptq.bitstream import pack_entries
from quant.vptq.config import METHOD, VptqLayer


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

    def __init__(self, packed: bool = True):
        self.packed = packed
        self.layers: dict[str, dict[str, Any]] = {}

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
        return {"quant_method": METHOD, "config_for_layers": dict(self.layers), "shared_layer_config": {},
                "enable_proxy_error": False}

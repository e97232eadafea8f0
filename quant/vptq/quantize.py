"""A simple VPTQ quantizer (writing path: tests): optional column norm (mean / std per
in-feature), optional perm (in-features by descending norm, so the outlier columns are the
largest), the outlier columns k-means'd in vectors of ovl, each column group's vectors of vl
k-means'd, then their residuals. Not VPTQ's Hessian-weighted optimisation; the format is the same."""

from __future__ import annotations

import torch

from quant.common.kmeans import kmeans, nearest
from quant.vptq.config import VptqLayer
from quant.vptq.packer import VptqCodes


def _column_vectors(w: torch.Tensor, vl: int) -> torch.Tensor:
    """[N, C] → vectors along N: [ceil(N/vl), C, vl] (rows zero-padded)."""
    n, c = w.shape
    w = torch.nn.functional.pad(w, (0, 0, 0, -n % vl))
    return w.reshape(-1, vl, c).permute(0, 2, 1)


def quantize_vptq(weight: torch.Tensor, layer: VptqLayer, dtype: torch.dtype = torch.float16, iters: int = 6,
                  seed: int = 0) -> VptqCodes:
    n, k = weight.shape
    L = layer
    O = L.outlier_cols
    if O + L.group_num * L.group_size != k:
        raise ValueError(f"{L.name}: outlier_size + group_num * group_size != in_features {k}")
    gen = torch.Generator().manual_seed(seed)
    w = weight.float()
    norms = w.norm(dim=0)  # of the weight as given: the norm below would flatten them
    scale = bias = None
    if L.enable_norm:
        bias = w.mean(0).to(dtype).float()
        scale = (w - bias).std(0).clamp(min=1e-6).to(dtype).float()
        w = (w - bias) / scale
    perm = None
    if L.enable_perm:
        perm = torch.argsort(norms, descending=True)
        w = w[:, perm]
    codes = VptqCodes(L, n, torch.empty(0), torch.empty(0), perm=perm, weight_scale=scale, weight_bias=bias)
    if O:
        vec = _column_vectors(w[:, :O], L.outlier_vector_len)  # [Ni, O, ovl]
        flat = vec.reshape(-1, L.outlier_vector_len)
        books = kmeans(flat, L.num_outlier_centroids, iters, gen).to(dtype).float()
        codes.outlier_centroids = books
        codes.outlier_indices = nearest(flat, books).reshape(vec.shape[:2])
    cents, idxs, res_cents, res_idxs = [], [], [], []
    for g in range(L.group_num):
        cols = w[:, O + g * L.group_size: O + (g + 1) * L.group_size]
        vec = _column_vectors(cols, L.vector_len)  # [Ni, gs, vl]
        flat = vec.reshape(-1, L.vector_len)
        books = kmeans(flat, L.num_centroids, iters, gen).to(dtype).float()
        idx = nearest(flat, books)
        cents.append(books)
        idxs.append(idx.reshape(vec.shape[:2]))
        if L.has_residual:
            resid = flat - books[idx]
            rbooks = kmeans(resid, L.num_res_centroids, iters, gen).to(dtype).float()
            res_cents.append(rbooks)
            res_idxs.append(nearest(resid, rbooks).reshape(vec.shape[:2]))
    codes.centroids, codes.indices = torch.stack(cents), torch.stack(idxs)
    if L.has_residual:
        codes.res_centroids, codes.res_indices = torch.stack(res_cents), torch.stack(res_idxs)
    return codes

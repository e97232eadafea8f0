"""A simple AQLM quantizer (writing path: tests, `random weights`): per-out-group scales, then
residual k-means, one codebook after another, each fitted on a sample of the residual vectors
and applied to all of them. Not AQLM's beam search; the format is the same."""

from __future__ import annotations

import torch

from quant.aqlm.packer import AqlmCodes
from quant.common.kmeans import kmeans, nearest


def quantize_aqlm(weight: torch.Tensor, num_codebooks: int, nbits: int, in_group_size: int, out_group_size: int,
                  dtype: torch.dtype = torch.float16, iters: int = 6, seed: int = 0) -> AqlmCodes:
    """AqlmCodes for a float weight [N, K]; codebooks and scales are fitted as `dtype` will store them."""
    n, k = weight.shape
    og, ig = out_group_size, in_group_size
    if n % og or k % ig:
        raise ValueError(f"weight {list(weight.shape)} is not whole {og}x{ig} groups")
    gen = torch.Generator().manual_seed(seed)
    w = weight.float().reshape(n // og, og, k // ig, ig)
    scales = w.pow(2).mean((1, 2, 3)).sqrt().clamp(min=1e-8).to(dtype).float()
    vectors = (w / scales[:, None, None, None]).permute(0, 2, 1, 3).reshape(-1, og * ig)
    books, codes = [], []
    residual = vectors
    for _ in range(num_codebooks):
        centroids = kmeans(residual, 1 << nbits, iters, gen).to(dtype).float()
        assign = nearest(residual, centroids)
        residual = residual - centroids[assign]
        books.append(centroids.reshape(-1, og, ig))
        codes.append(assign)
    return AqlmCodes(torch.stack(codes, 1).reshape(n // og, k // ig, num_codebooks), torch.stack(books), scales)

"""Plain k-means for codebook formats' writing paths (AQLM, VPTQ): nearest centroid in chunks,
Lloyd's iterations fitted on a sample of the vectors."""

from __future__ import annotations

import torch


def nearest(vectors: torch.Tensor, centroids: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Index of the nearest centroid (squared L2) for each vector, in chunks."""
    c2 = (centroids * centroids).sum(1)
    out = torch.empty(vectors.shape[0], dtype=torch.int64)
    for s in range(0, vectors.shape[0], chunk):
        v = vectors[s: s + chunk]
        out[s: s + chunk] = (c2[None, :] - 2 * v @ centroids.T).argmin(1)
    return out


def kmeans(vectors: torch.Tensor, k: int, iters: int, gen: torch.Generator, sample: int = 1 << 14) -> torch.Tensor:
    """k centroids fitted on at most `sample` of the vectors (Lloyd's iterations; empty clusters keep theirs)."""
    if vectors.shape[0] > sample:
        vectors = vectors[torch.randperm(vectors.shape[0], generator=gen)[:sample]]
    centroids = vectors[torch.randint(0, vectors.shape[0], (k,), generator=gen)].clone()
    for _ in range(iters):
        assign = nearest(vectors, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, vectors)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids

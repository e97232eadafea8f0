"""How the K rows of a GPTQ weight fall into quantization groups, worked out once at load.

Backends want rows sorted by group (act-order checkpoints store them shuffled) and, where they
can, groups of one size starting at row 0. `plan_groups` finds the row permutation that sorts the
groups and whether the sorted groups are uniform; `aligned_block` finds the coarsest block of rows
that never straddles a group boundary (misaligned tensor-parallel shards have unequal groups, e.g.
64 rows then 128s, which a per-group-size kernel cannot express but 64-row blocks can).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.layouts import GPTQLayout
from kernels.reference import gptq_group_ids


@dataclass
class GroupPlan:
    perm: torch.Tensor | None  # int64 [K]: row i of the sorted weight is stored row perm[i]; None: already sorted
    group_ids: torch.Tensor  # int64 [K]: group of each row in sorted order
    uniform_size: int | None  # s when group_ids == first_group + k // s for every k; else None
    first_group: int

    @property
    def sorted(self) -> bool:
        return self.perm is None


def plan_groups(layout: GPTQLayout) -> GroupPlan:
    g = gptq_group_ids(layout).to(torch.int64)
    K = g.numel()
    perm = None
    if K > 1 and bool((g[1:] < g[:-1]).any()):
        perm = torch.argsort(g, stable=True)
        g = g[perm]
    first = int(g[0]) if K else 0
    return GroupPlan(perm=perm, group_ids=g, uniform_size=_uniform_size(g, first), first_group=first)


def _uniform_size(sorted_ids: torch.Tensor, first: int) -> int | None:
    K = sorted_ids.numel()
    if K == 0:
        return None
    size = int((sorted_ids == first).sum())
    expected = first + torch.arange(K, device=sorted_ids.device) // size
    return size if torch.equal(sorted_ids, expected) else None


def aligned_block(sorted_ids: torch.Tensor, candidates: tuple[int, ...] = (256, 128, 64, 32)) -> int | None:
    """Largest b in `candidates` with K % b == 0 and one group per run of b sorted rows, else None."""
    K = sorted_ids.numel()
    for b in candidates:
        if K % b == 0 and K > 0:
            blocks = sorted_ids.view(K // b, b)
            if bool((blocks == blocks[:, :1]).all()):
                return b
    return None

"""CUDA graphs of the decode step, one per batch-size bucket.

A decode step of a few-billion-parameter model launches hundreds of small kernels; replaying a
captured graph removes their launch gaps. Graphs read static buffers (token ids, positions,
cache slots, lengths), so the KV cache must not move after capture: the worker allocates it whole
first. Rows that pad a batch up to its bucket write into a scratch cache slot nobody reads.

A step's inputs go up in one copy: they are written into a pinned host buffer laid out like the
device buffers (token ids, positions, slots, lengths: four rows of max_batch), which is then
copied whole (2 KB at 64) ahead of the replay, with no tensor made per step.
"""

from __future__ import annotations

import logging

import torch

from engine.batch import ForwardBatch
from engine.kv_cache import KVCache

logger = logging.getLogger(__name__)


def buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, cache: KVCache, max_batch: int, scratch_slot: int,
                 device: torch.device):
        self.model, self.cache, self.scratch_slot = model, cache, scratch_slot
        self.max_batch = max_batch
        self.inputs = torch.zeros(4, max_batch, dtype=torch.long, device=device)
        self.inputs[2] = scratch_slot
        self.inputs[3] = 1
        self.token_ids, self.positions, self.slots, self.kv_lens = self.inputs.unbind(0)
        self.staging = torch.empty(4, max_batch, dtype=torch.long, pin_memory=True)
        self.staging.copy_(self.inputs)
        self.staged = self.staging.numpy()  # writes through numpy: no torch op per field
        self.copied = torch.cuda.Event()  # the last upload has left the staging buffer
        # a benchmark sets a list here: each step then appends (upload start, replay end) timing events
        self.step_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        # Each graph reads its batch's index tensors (rows) by address: they must outlive the capture.
        self.batches: dict[int, ForwardBatch] = {}
        pool = None
        for size in reversed(buckets(max_batch)):  # largest first, so smaller ones reuse its pool
            batch = self.batches[size] = self._batch(size)
            with torch.inference_mode():
                for _ in range(2):  # warm-up: Triton autotuning and allocator growth happen outside capture
                    self._forward(batch)
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[size] = self._forward(batch)
            pool = graph.pool()
            self.graphs[size] = graph
        self.sizes = sorted(self.graphs)
        logger.info("captured decode graphs for batch sizes %s", sorted(self.graphs))

    def _batch(self, size: int) -> ForwardBatch:
        return ForwardBatch.decode_view(self.token_ids[:size], self.positions[:size], self.slots[:size],
                                        self.kv_lens[:size])

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model.compute_logits(self.model(batch, self.cache))

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.max_batch

    def run(self, token_ids: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """Logits [B, V] of one decode step; each sequence's new token sits at `positions`."""
        n = len(token_ids)
        size = next(s for s in self.sizes if s >= n)
        staged = self.staged
        self.copied.synchronize()  # normally long done: the previous step's results were read since
        staged[0, :n] = token_ids
        staged[1, :n] = positions
        staged[2, :n] = slots
        staged[3, :n] = positions
        staged[3, :n] += 1
        if size > n:  # padding rows: token 0 at position 0 of the scratch slot
            staged[0:2, n:size] = 0
            staged[2, n:size] = self.scratch_slot
            staged[3, n:size] = 1
        timing = self.step_events is not None
        if timing:
            began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            began.record()
        self.inputs.copy_(self.staging, non_blocking=True)
        self.copied.record()
        self.graphs[size].replay()
        if timing:
            ended.record()
            self.step_events.append((began, ended))
        return self.logits[size][:n]

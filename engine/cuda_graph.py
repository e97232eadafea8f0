"""CUDA graphs of the decode step, one per batch-size bucket.

A decode step of a few-billion-parameter model launches hundreds of small kernels; replaying a
captured graph removes their launch gaps. Graphs read static buffers (token ids, positions, each
new token's block and offset, lengths, and a block-table buffer of max_batch x max_blocks), so the
paged KV cache never moves: it is allocated once, before capture. Rows that pad a batch up to its
bucket write into the cache's scratch block, which no sequence's table lists.

A step's inputs go up in two copies: they are written into pinned host buffers laid out like
the device buffers (token ids, positions, blocks, offsets: four int64 rows of max_batch; lengths
and tables: int32), which are copied whole ahead of the replay, with no tensor made per step.
Only each sequence's table prefix is written: the kernel reads no entry past a sequence's length.
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
    def __init__(self, model: torch.nn.Module, cache: KVCache, max_batch: int, max_blocks: int,
                 device: torch.device):
        self.model, self.cache, self.scratch = model, cache, cache.scratch_block
        self.max_batch, self.max_blocks, self.block_size = max_batch, max_blocks, cache.block_size
        self.inputs = torch.zeros(4, max_batch, dtype=torch.long, device=device)
        self.inputs[2] = self.scratch
        self.token_ids, self.positions, self.blocks, self.offsets = self.inputs.unbind(0)
        # lengths [max_batch] then tables [max_batch, max_blocks], int32, in one buffer
        self.ints = torch.full((max_batch * (1 + max_blocks),), self.scratch, dtype=torch.int32, device=device)
        self.ints[:max_batch] = 1
        self.kv_lens = self.ints[:max_batch]
        self.tables = self.ints[max_batch:].view(max_batch, max_blocks)
        self.staging = torch.empty(4, max_batch, dtype=torch.long, pin_memory=True)
        self.staging.copy_(self.inputs)
        self.staged = self.staging.numpy()  # writes through numpy: no torch op per field
        self.int_staging = torch.empty(self.ints.shape, dtype=torch.int32, pin_memory=True)
        self.int_staging.copy_(self.ints)
        self.int_staged = self.int_staging.numpy()
        self.staged_lens = self.int_staged[:max_batch]
        self.staged_tables = self.int_staged[max_batch:].reshape(max_batch, max_blocks)
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
        return ForwardBatch.decode_view(self.token_ids[:size], self.positions[:size], self.blocks[:size],
                                        self.offsets[:size], self.tables[:size], self.kv_lens[:size], self.block_size)

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        # the batch object outlives the capture, but what a forward derives from its buffers once a
        # step (the new keys' cache rows) must be derived inside the graph, on every replay
        batch.clear_step_cache()
        return self.model.compute_logits(self.model(batch, self.cache))

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.max_batch

    def run(self, token_ids: list[int] | None, positions: list[int], tables: list[list[int]],
            device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, V] of one decode step; each sequence's new token sits at `positions`, its
        blocks are `tables` (at least those covering positions + 1). The tokens come from the host
        (`token_ids`) or, for a step launched before the previous one's tokens were read, from
        the device (`device_tokens` [B], copied into the graph's input row behind the upload)."""
        n = len(positions)
        size = next(s for s in self.sizes if s >= n)
        staged, bs = self.staged, self.block_size
        self.copied.synchronize()  # normally long done: the previous step's results were read since
        staged[0, :n] = token_ids if device_tokens is None else 0
        staged[1, :n] = positions
        for i, (p, table) in enumerate(zip(positions, tables)):
            used = p // bs + 1
            staged[2, i] = table[p // bs]
            self.staged_tables[i, :used] = table[:used]
        staged[3, :n] = staged[1, :n] % bs
        self.staged_lens[:n] = staged[1, :n] + 1
        if size > n:  # padding rows: token 0 at position 0 of the scratch block
            staged[0:2, n:size] = 0
            staged[2, n:size] = self.scratch
            staged[3, n:size] = 0
            self.staged_lens[n:size] = 1
            self.staged_tables[n:size, 0] = self.scratch
        timing = self.step_events is not None
        if timing:
            began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            began.record()
        self.inputs.copy_(self.staging, non_blocking=True)
        self.ints.copy_(self.int_staging, non_blocking=True)
        self.copied.record()
        if device_tokens is not None:
            self.token_ids[:n].copy_(device_tokens)
        self.graphs[size].replay()
        if timing:
            ended.record()
            self.step_events.append((began, ended))
        return self.logits[size][:n]

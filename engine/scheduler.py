"""Continuous batching over a paged KV cache: what each step computes.

Every step, in this order, within max_num_batched_tokens tokens:
1. every running sequence that is decoding gets its next token (oldest first). A sequence whose
   next position needs a block when none is free preempts the youngest running sequence (by
   recompute: its blocks are freed and it goes back to the front of the queue; when it is
   admitted again it recomputes prompt + generated tokens, reusing what the prefix cache kept);
2. running sequences still in prefill get their next chunk (oldest first);
3. waiting sequences are admitted while blocks for all their tokens and a sequence place are
   free, each taking a chunk of what budget is left.
So a long prompt is split into chunks and never stalls the running decodes. A sequence samples
only in the step that computes its last token. A prompt that asks for prompt logprobs is not
chunked (it runs whole, alone if it is longer than the budget) and reads no cached prefix.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.sequence import Sequence, Status

logger = logging.getLogger(__name__)


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int  # computed this step: the sequence's tokens [num_cached, num_cached + num_tokens)
    sample: bool  # the chunk reaches its last token, so the step samples its next one

    @property
    def token_ids(self) -> list[int]:
        s = self.seq
        return s.all_token_ids()[s.num_cached:s.num_cached + self.num_tokens]


def wants_prompt_logprobs(seq: Sequence) -> bool:
    return bool(seq.params.prompt_logprobs) and seq.prompt_logprobs is None


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, blocks: BlockManager):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the youngest
        self.finished_ids: list[int] = []  # the workers' samplers forget these next step
        self.cut: list[Sequence] = []  # finished for want of cache memory, not yet reported
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -------------------------------------------------------------------------------

    def schedule(self) -> list[Scheduled]:
        budget = self.max_num_batched_tokens
        out: list[Scheduled] = []
        for seq in [s for s in self.running if s.num_tokens - s.num_cached == 1]:
            if budget == 0:
                break
            if seq.status != Status.RUNNING or not self._room_for_next(seq):
                continue
            out.append(Scheduled(seq, 1, True))
            budget -= 1
        for seq in [s for s in self.running if s.num_tokens - s.num_cached > 1]:
            if budget == 0:
                break
            n = self._chunk(seq, budget, alone=not out)
            if n:
                out.append(Scheduled(seq, n, seq.num_cached + n == seq.num_tokens))
                budget -= n
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            tokens = seq.all_token_ids()
            if wants_prompt_logprobs(seq) and len(tokens) > budget and out:
                break
            if not self.blocks.can_allocate(tokens):
                if not self.running and not out:  # alone and still too long: the cache cannot hold it
                    self.waiting.popleft()
                    self._cut(seq)
                    continue
                break
            self.waiting.popleft()
            seq.num_cached = self.blocks.allocate(seq.seq_id, tokens, use_prefix_cache=not wants_prompt_logprobs(seq))
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = self._chunk(seq, budget, alone=not out)
            out.append(Scheduled(seq, n, seq.num_cached + n == seq.num_tokens))
            budget -= n
        return out

    def _chunk(self, seq: Sequence, budget: int, alone: bool) -> int:
        left = seq.num_tokens - seq.num_cached
        if wants_prompt_logprobs(seq):  # whole, or not this step (alone: whole even past the budget)
            return left if left <= budget or alone else 0
        return min(left, budget)

    def _room_for_next(self, seq: Sequence) -> bool:
        """A block for seq's next position, preempting the youngest running sequences for it;
        False when seq itself had to go."""
        while not self.blocks.can_append(seq.seq_id, seq.num_tokens):
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:
                self._cut(seq)  # alone and the cache is full: it can grow no further
                return False
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.append(seq.seq_id, seq.num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_cached = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug("preempted sequence %d (%d tokens) for want of KV blocks", seq.seq_id, seq.num_tokens)

    def _cut(self, seq: Sequence) -> None:
        logger.warning("sequence %d (%d tokens) does not fit the KV cache (%d blocks of %d): finished as 'length'",
                       seq.seq_id, seq.num_tokens, self.blocks.num_blocks, self.blocks.block_size)
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status = Status.FINISHED
        seq.finish_reason = "length"
        self.finished_ids.append(seq.seq_id)
        self.cut.append(seq)

    def computed(self, item: Scheduled) -> None:
        """After the step: the chunk's keys and values are in the cache."""
        seq = item.seq
        seq.num_cached += item.num_tokens
        self.blocks.mark_computed(seq.seq_id, seq.all_token_ids(), seq.num_cached)

    # -- leaving --------------------------------------------------------------------------------

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        self.finished_ids.append(seq.seq_id)

    def abort(self, seq: Sequence) -> None:
        """Take a sequence out wherever it is; its blocks are free at once."""
        if seq.status == Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status == Status.RUNNING:
            self.running.remove(seq)
        if seq.status != Status.FINISHED or seq.seq_id not in self.finished_ids:
            self.finished_ids.append(seq.seq_id)
        self.blocks.free(seq.seq_id)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"

    def take_finished_ids(self) -> list[int]:
        ids, self.finished_ids = self.finished_ids, []
        return ids

    def take_cut(self) -> list[Sequence]:
        cut, self.cut = self.cut, []
        return cut

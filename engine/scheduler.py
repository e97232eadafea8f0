"""Continuous batching: every step runs all running sequences' next token plus as many waiting
prompts as fit; finished sequences leave the batch at once and free their cache slot."""

from __future__ import annotations

from collections import deque

from engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.finished_ids: list[int] = []  # to drop from the workers' caches next step

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Sequence]:
        budget = self.max_num_batched_tokens - len(self.running)
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cost = len(seq.next_tokens())
            # A prompt longer than the whole budget still runs, alone, rather than never.
            if cost > budget and (self.running or cost <= self.max_num_batched_tokens):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            budget -= cost
        return list(self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.running.remove(seq)
        self.finished_ids.append(seq.seq_id)

    def abort(self, seq: Sequence) -> None:
        """Take a sequence out wherever it is; one that ran has a cache slot to drop next step."""
        if seq.status == Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status == Status.RUNNING:
            self.running.remove(seq)
            self.finished_ids.append(seq.seq_id)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"

    def take_finished_ids(self) -> list[int]:
        ids, self.finished_ids = self.finished_ids, []
        return ids

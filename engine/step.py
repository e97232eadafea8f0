"""One engine step as sent to every rank, and what rank 0 sends back.

Every rank must run the same step; only rank 0 samples, so only it needs sampling parameters.
`encode`/`decode` turn the rank-independent part into one int64 tensor for a broadcast over the
control group (torchrun and mp followers); no pickling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.sampling import PenaltyTokens, SamplingParams
from kernels.errors import QShardError

STOP = 1  # flag: followers leave their loop
END_OF_CALL = 2  # flag: the driver's generate() call is over (SPMD followers return)


@dataclass
class StepInput:
    seq_ids: list[int]
    token_ids: list[list[int]]  # new tokens of each sequence this step
    context_lens: list[int]  # tokens of each sequence already in the KV cache
    finished: list[int] = field(default_factory=list)  # sequences to drop before this step
    prompt_logprobs: list[bool] = field(default_factory=list)  # logits for every new token of that sequence
    sampling: list[SamplingParams] | None = None  # rank 0 only
    flags: int = 0
    penalties: list[PenaltyTokens | None] | None = None  # rank 0 only: penalised sequences' new tokens
    # each sequence's KV blocks (engine.block_manager), at least those its positions reach this step
    block_tables: list[list[int]] = field(default_factory=list)
    # whether a sequence samples this step (False: a prefill chunk before its prompt's last); empty: all do
    sample: list[bool] = field(default_factory=list)
    # a decode step launched before the previous step's tokens reached the host (async scheduling):
    # row i's new token is the one the previous step sampled in its row previous_rows[i], read on
    # the device (None: the tokens are in token_ids)
    previous_rows: list[int] | None = None

    def samples(self, i: int) -> bool:
        return not self.sample or self.sample[i]

    def encode(self) -> torch.Tensor:
        if self.previous_rows is not None:  # the tokens exist only on rank 0's device
            raise QShardError("a step that takes the previous step's tokens on the device runs in one process "
                              "only (async scheduling needs the uni executor)")
        n = len(self.seq_ids)
        want_all = self.prompt_logprobs or [False] * n
        tables = self.block_tables or [[] for _ in range(n)]
        sample = self.sample or [True] * n
        header = [self.flags, n, len(self.finished)]
        body = (list(self.seq_ids) + list(self.context_lens) + [len(t) for t in self.token_ids]
                + [int(w) for w in want_all] + [int(x) for x in sample] + [len(t) for t in tables]
                + list(self.finished) + [t for seq in self.token_ids for t in seq] + [b for t in tables for b in t])
        return torch.tensor(header + body, dtype=torch.int64)

    @classmethod
    def decode(cls, t: torch.Tensor) -> "StepInput":
        v = t.tolist()
        flags, n, n_finished = v[:3]
        pos = 3
        seq_ids, pos = v[pos:pos + n], pos + n
        context_lens, pos = v[pos:pos + n], pos + n
        query_lens, pos = v[pos:pos + n], pos + n
        want_all, pos = [bool(x) for x in v[pos:pos + n]], pos + n
        sample, pos = [bool(x) for x in v[pos:pos + n]], pos + n
        table_lens, pos = v[pos:pos + n], pos + n
        finished, pos = v[pos:pos + n_finished], pos + n_finished
        token_ids, tables = [], []
        for q in query_lens:
            token_ids.append(v[pos:pos + q])
            pos += q
        for w in table_lens:
            tables.append(v[pos:pos + w])
            pos += w
        return cls(seq_ids, token_ids, context_lens, finished, want_all, None, flags, block_tables=tables, sample=sample)

    @classmethod
    def control(cls, flags: int) -> "StepInput":
        return cls([], [], [], flags=flags)


class PendingOutput:
    """Rank 0's output of a launched step: `result()` waits for its tokens to reach the host."""

    def __init__(self, done: "StepOutput | None" = None, sampled=None):
        self._done, self._sampled = done, sampled  # sampled: an engine.sampler.DeviceSample

    def result(self) -> "StepOutput":
        if self._done is None:
            tokens, logprobs = self._sampled.to_host()
            self._done = StepOutput(tokens, logprobs)
        return self._done


@dataclass
class StepOutput:
    token_ids: list[int]  # the next token of each sampling sequence, in step order (StepInput.sample)
    logprobs: list[dict[int, float] | None] | None = None
    prompt_logprobs: list[list[float] | None] | None = None  # log p(token_j | prefix) for new tokens j >= 1

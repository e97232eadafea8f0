"""The step engine: requests come in at any time; each `step()` runs one batched model step on
every rank and returns the outputs of the requests it advanced.

`LLM.generate` is a loop over it (add every prompt, step until none is left); a server adds
requests as they arrive and streams each step's deltas. The engine does not own the executor:
whoever built it (LLM) shuts it down.
"""

from __future__ import annotations

import itertools
from typing import Any

from engine.config import ModelConfig
from engine.engine_config import EngineConfig
from engine.executor.base import Executor
from engine.output_processor import OutputProcessor, RequestState, completion_sequences
from engine.request_output import RequestOutput
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.step import StepInput
from kernels.errors import InputError


class LLMEngine:
    def __init__(self, executor: Executor, tokenizer, config: EngineConfig, model_config: ModelConfig):
        """tokenizer: the checkpoint's HF tokenizer, or None (outputs then have token ids and no text)."""
        self.executor = executor
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens)
        self.processor = OutputProcessor(model_config.eos_token_ids, config.max_model_len)
        self.requests: dict[Any, RequestState] = {}  # unfinished requests by request id
        self._seq_ids = itertools.count()  # the workers' ids: never reused, so no stale cache is ever read

    def add_request(self, request_id: Any, prompt_token_ids: list[int], params: SamplingParams,
                    prompt_text: str | None = None) -> None:
        """Queue a request; it starts at the next step that has room for it."""
        if request_id in self.requests:
            raise InputError(f"request {request_id!r} is already in the engine")
        if not isinstance(params, SamplingParams):
            raise InputError(f"request {request_id!r}: sampling parameters are a {type(params).__name__}, "
                             f"not SamplingParams")
        if not prompt_token_ids:
            raise InputError(f"request {request_id!r} has an empty prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InputError(f"request {request_id!r}: the prompt has {len(prompt_token_ids)} tokens; "
                             f"max_model_len={self.max_model_len} leaves no room to generate")
        seqs = completion_sequences(request_id, prompt_token_ids, params, self._seq_ids)  # n of them
        self.requests[request_id] = RequestState(request_id, prompt_text, seqs, self.tokenizer)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: Any) -> None:
        """Drop a request: no more outputs for it; its cache slot is freed at the next step.
        An unknown or finished request id is ignored (a client may go away as its request ends)."""
        state = self.requests.pop(request_id, None)
        if state is not None:
            for seq in state.seqs:
                self.scheduler.abort(seq)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        finished = self.scheduler.take_finished_ids()
        if not batch:
            self._drop(finished)
            return []
        step = StepInput(
            seq_ids=[s.seq_id for s in batch], token_ids=[s.next_tokens() for s in batch],
            context_lens=[s.num_cached for s in batch], finished=finished,
            prompt_logprobs=[s.params.prompt_logprobs and s.num_cached == 0 for s in batch],
            sampling=[s.params for s in batch])
        step.penalties = self._penalties(batch, step.token_ids)
        out = self.executor.execute(step)
        advanced: dict[Any, RequestState] = {}  # in step order, each request once (n sequences each)
        for i, seq in enumerate(batch):
            seq.num_cached += len(step.token_ids[i])
            if out.prompt_logprobs and out.prompt_logprobs[i] is not None:
                seq.prompt_logprobs = out.prompt_logprobs[i]
            state = advanced[seq.request_id] = self.requests[seq.request_id]
            reason = self.processor.append(state, out.token_ids[i], out.logprobs[i] if out.logprobs else None, seq)
            if reason:
                self.scheduler.finish(seq, reason)
        outputs = []
        for request_id, state in advanced.items():
            if state.finished:
                del self.requests[request_id]
            outputs.append(state.output())
        if not self.scheduler.has_work():  # idle: free the last finished caches now, not at the next request
            self._drop(self.scheduler.take_finished_ids())
        return outputs

    def _penalties(self, batch: list, token_ids: list[list[int]]):
        """Rank 0's token counts update for the penalised sequences (None when there are none)."""
        if not any(s.params.penalized for s in batch):
            return None
        return [self.requests[s.request_id].completion(s).penalty_tokens(len(t)) for s, t in zip(batch, token_ids)]

    def _drop(self, seq_ids: list[int]) -> None:
        if seq_ids:
            self.executor.execute(StepInput([], [], [], finished=seq_ids, sampling=[]))

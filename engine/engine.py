"""The step engine: requests come in at any time; each `step()` runs one batched model step on
every rank and returns the outputs of the requests it advanced.

`LLM.generate` is a loop over it (add every prompt, step until none is left); a server adds
requests as they arrive and streams each step's deltas. The engine does not own the executor:
whoever built it (LLM) shuts it down.

KV memory is the driver's: a block manager (engine.block_manager) hands each sequence blocks of
every rank's paged cache, and the block tables travel with each step. The block count is the
ranks' (engine.kv_cache.num_kv_blocks: computed from the config here as on every rank; on CUDA
without kv_cache_memory the ranks profile and agree on it, and the driver reads it back).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from engine.block_manager import BlockManager
from engine.config import ModelConfig
from engine.engine_config import EngineConfig
from engine.executor.base import Executor
from engine.kv_cache import num_kv_blocks
from engine.output_processor import OutputProcessor, RequestState, completion_sequences
from engine.request_output import RequestOutput
from engine.sampling import SamplingParams
from engine.scheduler import Scheduled, Scheduler, wants_prompt_logprobs
from engine.sequence import Status
from engine.step import PendingOutput, StepInput
from kernels.errors import InputError


class LLMEngine:
    def __init__(self, executor: Executor, tokenizer, config: EngineConfig, model_config: ModelConfig):
        """tokenizer: the checkpoint's HF tokenizer, or None (outputs then have token ids and no text)."""
        self.executor = executor
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len
        self.block_manager = BlockManager(driver_kv_blocks(executor, config, model_config), config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, self.block_manager)
        self.counters = {"prefill_tokens": 0, "decode_tokens": 0, "steps": 0, "continued_steps": 0}
        self.async_scheduling = config.async_scheduling
        if self.async_scheduling is None:
            self.async_scheduling = executor.overlaps_by_default
        elif self.async_scheduling and not executor.can_overlap:
            raise InputError(f"async_scheduling=True needs an executor of one in-process rank (uni), not "
                             f"{type(executor).__name__}")
        self._in_flight: InFlight | None = None  # a launched step whose tokens are not read yet
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
        bm = self.block_manager
        if bm.blocks_for(len(prompt_token_ids)) > bm.num_blocks:
            raise InputError(f"request {request_id!r}: the prompt has {len(prompt_token_ids)} tokens; the KV cache "
                             f"holds {bm.num_blocks * bm.block_size} (raise kv_cache_memory)")
        seqs = completion_sequences(request_id, prompt_token_ids, params, self._seq_ids)  # n of them
        self.requests[request_id] = RequestState(request_id, prompt_text, seqs, self.tokenizer)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: Any) -> None:
        """Drop a request: no more outputs for it; its KV blocks are free at once.
        An unknown or finished request id is ignored (a client may go away as its request ends)."""
        state = self.requests.pop(request_id, None)
        if state is not None:
            for seq in state.seqs:
                self.scheduler.abort(seq)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Run one step and return the outputs of the requests it advanced. With async scheduling
        a decode step is launched first, then (when the same sequences go on decoding) its
        continuation is launched behind it on the device, and only then are the first step's tokens
        read and processed: the host's work of one step overlaps the GPU's work of the next."""
        flight = self._in_flight
        if flight is not None and not any(item.seq.status is Status.RUNNING for item in flight.scheduled):
            flight.pending.result()  # all its sequences ended meanwhile: nothing of it is used
            self._in_flight = flight = None
        cut: list[RequestOutput] = []
        if flight is None:
            scheduled = self.scheduler.schedule()
            finished = self.scheduler.take_finished_ids()
            cut = self._report_cut()
            if not scheduled:
                self._drop(finished)
                return cut
            step = self._step_input(scheduled, finished)
            if not (self.async_scheduling and continuable(step)):
                return cut + self._process(scheduled, self.executor.execute(step))
            flight = InFlight(scheduled, self.executor.launch(step))
        self._in_flight = self._launch_continuation(flight)
        return cut + self._process(flight.scheduled, flight.pending.result())

    def _step_input(self, scheduled: list[Scheduled], finished: list[int]) -> StepInput:
        batch = [item.seq for item in scheduled]
        bm = self.block_manager
        step = StepInput(
            seq_ids=[s.seq_id for s in batch], token_ids=[item.token_ids for item in scheduled],
            context_lens=[s.num_cached for s in batch], finished=finished,
            prompt_logprobs=[wants_prompt_logprobs(s) and s.num_cached == 0 and item.sample
                             for s, item in zip(batch, scheduled)],
            sampling=[s.params for s in batch], block_tables=[bm.table(s.seq_id) for s in batch],
            sample=[item.sample for item in scheduled])
        step.penalties = self._penalties(batch, step.token_ids, step.sample)
        return step

    def _launch_continuation(self, flight: "InFlight") -> "InFlight | None":
        """Launch the next decode step of the in-flight step's running sequences before its tokens
        are known (each row's token is fed back on the device); None where the next step may
        differ: requests waiting to be admitted, every sequence ending at this token, or too few
        free blocks for the next positions (the next step then schedules, and preempts, as usual).
        A sequence that turns out to end at the in-flight token has its continued row computed
        and dropped."""
        if self.scheduler.waiting:
            return None
        rows = [i for i, item in enumerate(flight.scheduled) if item.seq.status is Status.RUNNING]
        seqs = [flight.scheduled[i].seq for i in rows]
        if all(self._ends_by_length(s) for s in seqs):  # also when none is left
            return None
        bm = self.block_manager
        # after the in-flight token a sequence holds num_tokens + 1 tokens, the last one computed next
        need = sum(max(0, bm.blocks_for(s.num_tokens + 1) - len(bm.table(s.seq_id))) for s in seqs)
        if need > bm.num_free:
            return None
        for s in seqs:
            bm.append(s.seq_id, s.num_tokens + 1)
        step = StepInput(
            seq_ids=[s.seq_id for s in seqs], token_ids=[[-1] for _ in seqs],
            context_lens=[s.num_cached + 1 for s in seqs], finished=self.scheduler.take_finished_ids(),
            sampling=[s.params for s in seqs], block_tables=[bm.table(s.seq_id) for s in seqs],
            previous_rows=rows)
        self.counters["continued_steps"] += 1
        return InFlight([Scheduled(s, 1, True) for s in seqs], self.executor.launch(step))

    def _ends_by_length(self, seq) -> bool:
        """Whether the sequence's next token (the in-flight one) is its last by max_tokens or length."""
        return len(seq.output_token_ids) + 1 >= seq.params.max_tokens or seq.num_tokens + 1 >= self.max_model_len

    def _process(self, scheduled: list[Scheduled], out) -> list[RequestOutput]:
        """Append a computed step's tokens, run the stop checks, and make the outputs. A row whose
        sequence ended or was aborted after the step was launched is dropped."""
        batch = [item.seq for item in scheduled]
        self.counters["steps"] += 1
        advanced: dict[Any, RequestState] = {}  # in step order, each request once (n sequences each)
        for i, (seq, item) in enumerate(zip(batch, scheduled)):
            if seq.status is not Status.RUNNING:
                continue
            self._count(seq, item.num_tokens)
            self.scheduler.computed(item)
            if out.prompt_logprobs and out.prompt_logprobs[i] is not None:
                seq.prompt_logprobs = out.prompt_logprobs[i]
            if not item.sample:  # a prefill chunk before the prompt's end: nothing to report yet
                continue
            state = advanced[seq.request_id] = self.requests[seq.request_id]
            reason = self.processor.append(state, out.token_ids[i], out.logprobs[i] if out.logprobs else None, seq)
            if reason:
                self.scheduler.finish(seq, reason)
        outputs = []
        for request_id, state in advanced.items():
            if state.finished:
                del self.requests[request_id]
            outputs.append(state.output())
        if not self.scheduler.has_work():  # idle: tell the samplers now, not at the next request
            self._drop(self.scheduler.take_finished_ids())
        return outputs

    def _count(self, seq, num_tokens: int) -> None:
        """Prefill tokens: prompt positions, and generated ones computed again after a preemption."""
        start = seq.num_cached
        prefill = max(0, min(start + num_tokens, max(len(seq.prompt_token_ids), seq.num_tokens - 1)) - start)
        self.counters["prefill_tokens"] += prefill
        self.counters["decode_tokens"] += num_tokens - prefill

    def _report_cut(self) -> list[RequestOutput]:
        """Outputs of requests whose sequences the scheduler finished for want of cache memory."""
        outputs = []
        for seq in self.scheduler.take_cut():
            state = self.requests.get(seq.request_id)
            if state is not None and state.finished:
                del self.requests[seq.request_id]
                outputs.append(state.output())
        return outputs

    def stats(self) -> dict[str, Any]:
        """What a /metrics endpoint shows: requests running and waiting, KV blocks used of the
        total, prefix-cache hit rate (prompt tokens found cached / looked up), preemptions, and
        token counters since the engine started."""
        bm, sched = self.block_manager, self.scheduler
        queries, hits = bm.counters.prefix_queries, bm.counters.prefix_hits
        return {
            "running": len(sched.running), "waiting": len(sched.waiting),
            "kv_blocks_used": bm.num_used, "kv_blocks_total": bm.num_blocks, "kv_block_size": bm.block_size,
            "kv_cache_usage": bm.num_used / bm.num_blocks,
            "prefix_cache_queries": queries, "prefix_cache_hits": hits,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0,
            "preemptions": sched.num_preemptions, **self.counters,
        }

    def _penalties(self, batch: list, token_ids: list[list[int]], sample: list[bool]):
        """Rank 0's token counts update for the penalised sequences that sample this step (None
        when there are none; a chunk that does not sample sends nothing, so the sampling chunk
        finds the cache grown past what was sent and sends everything)."""
        if not any(s.params.penalized for s in batch):
            return None
        return [self.requests[s.request_id].completion(s).penalty_tokens(len(t)) if want else None
                for s, t, want in zip(batch, token_ids, sample)]

    def _drop(self, seq_ids: list[int]) -> None:
        if seq_ids:
            self.executor.execute(StepInput([], [], [], finished=seq_ids, sampling=[]))


@dataclass
class InFlight:
    scheduled: list[Scheduled]
    pending: PendingOutput


def continuable(step: StepInput) -> bool:
    """A step whose next one can be launched before its tokens are read: every row decodes one
    token and samples it, and no row needs its tokens on the host first (penalty counts)."""
    return (all(len(t) == 1 for t in step.token_ids) and all(step.samples(i) for i in range(len(step.seq_ids)))
            and not any(step.prompt_logprobs) and step.penalties is None)


def driver_kv_blocks(executor: Executor, config: EngineConfig, model_config: ModelConfig) -> int:
    """The ranks' KV block count: from the config (as every rank computes it), else the profiled
    count the ranks agreed on, from the driver's own rank or the ranks' statistics."""
    blocks = num_kv_blocks(config, model_config)
    if blocks is not None:
        return blocks
    worker = getattr(executor, "worker", None)
    if worker is not None:
        return worker.num_kv_blocks
    return min(s["kv_cache_blocks"] for s in executor.collect_stats())

"""Output processing: a sampled token appended to its completion, the stop checks, and the text.

A request of SamplingParams.n = k runs as k sequences (`completion_sequences`), one
CompletionState each; the RequestState gathers them into one RequestOutput.

The stop checks, in order (the same as `LLM.generate` always had, and vLLM's):
- an EOS token (unless `ignore_eos`) or one of `stop_token_ids`: "stop"; the token stays in
  `token_ids` but adds no text (unless include_stop_str_in_output; a special token has none);
- a stop string in the text: "stop", the text cut where it starts (or where it ends, with
  include_stop_str_in_output); a string earlier in `SamplingParams.stop` wins when several end in
  the same token. Only the new text and the len(stop) - 1 characters before it are searched: any
  earlier match would have stopped sooner, so a string split over several tokens is found once
  its last piece arrives;
- `max_tokens` generated, or the sequence at `max_model_len`: "length".

Streaming: a completion with stop strings keeps its last len(longest stop) - 1 characters unsent
until it finishes, so no delta ever shows part of a stop string that is cut away later (nothing
is held back with include_stop_str_in_output: no text is ever cut before the stop's end).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from engine.detokenizer import IncrementalDetokenizer
from engine.request_output import CompletionOutput, RequestOutput
from engine.sampling import PenaltyTokens, SamplingParams
from engine.sequence import Sequence


def completion_sequences(request_id: Any, prompt_token_ids: list[int], params: SamplingParams,
                         seq_ids: Iterator[int]) -> list[Sequence]:
    """The n sequences of a request. Completion 0 keeps the request's parameters; the others get
    a seed derived from a set one (distinct, reproducible draws) and skip prompt logprobs (the
    prompt is the same)."""
    seqs = []
    for index in range(params.n):
        p = params if index == 0 else dataclasses.replace(params, seed=params.completion_seed(index),
                                                          prompt_logprobs=False)
        seqs.append(Sequence(next(seq_ids), list(prompt_token_ids), p, request_id=request_id))
    return seqs


class CompletionState:
    """The output side of one sequence: its text so far, how much was sent, and what the
    penalised sampler on rank 0 has been told of its tokens."""

    def __init__(self, index: int, seq: Sequence, tokenizer):
        self.index, self.seq = index, seq
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.text = ""
        self.sent = 0  # characters of `text` already in a delta
        p = seq.params
        self.hold = 0 if p.include_stop_str_in_output else max(map(len, p.stop), default=1) - 1
        self.stop_reason: int | str | None = None
        self.cumulative_logprob = 0.0
        self._penalty_sent: int | None = None  # output tokens the sampler has counted (None: nothing)
        self._cached_after: int | None = None  # num_cached expected at this sequence's next step

    def penalty_tokens(self, num_new_tokens: int) -> PenaltyTokens | None:
        """What the sampler must add to this sequence's token counts in a step that runs
        `num_new_tokens` of it; None when it has no penalties. A sequence whose cache did not
        grow as its last step said (preempted and recomputed, its sampler state maybe dropped)
        sends everything again."""
        s = self.seq
        if not s.params.penalized:
            return None
        restart = self._penalty_sent is None or s.num_cached != self._cached_after
        self._cached_after = s.num_cached + num_new_tokens
        start = 0 if restart else self._penalty_sent
        self._penalty_sent = len(s.output_token_ids)
        return PenaltyTokens(start, s.output_token_ids[start:], list(s.prompt_token_ids) if restart else None)

    def output(self) -> CompletionOutput:
        """This completion now: the text not yet sent (less what is held back) as the delta."""
        s, finished = self.seq, self.seq.finish_reason is not None
        end = len(self.text) if finished else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:end], end
        want_logprobs = s.params.logprobs is not None
        return CompletionOutput(self.index, self.text[:end], list(s.output_token_ids), s.finish_reason,
                                self.stop_reason, list(s.logprobs) if want_logprobs else None,
                                self.cumulative_logprob if want_logprobs else None, delta)


class RequestState:
    """The output side of one request: its n completions."""

    def __init__(self, request_id: Any, prompt_text: str | None, seqs: Sequence | list[Sequence], tokenizer):
        self.request_id = request_id
        self.prompt_text = prompt_text
        seqs = [seqs] if isinstance(seqs, Sequence) else list(seqs)
        self.completions = [CompletionState(i, s, tokenizer) for i, s in enumerate(seqs)]
        self._of_seq = {s.seq_id: c for s, c in zip(seqs, self.completions)}

    @property
    def seq(self) -> Sequence:
        """The first completion's sequence (the only one when n = 1)."""
        return self.completions[0].seq

    @property
    def seqs(self) -> list[Sequence]:
        return [c.seq for c in self.completions]

    def completion(self, seq: Sequence) -> CompletionState:
        return self._of_seq[seq.seq_id]

    @property
    def finished(self) -> bool:
        return all(c.seq.finish_reason is not None for c in self.completions)

    def output(self) -> RequestOutput:
        outs = [c.output() for c in self.completions]
        first, seq = outs[0], self.seq
        return RequestOutput(self.prompt_text, seq.prompt_token_ids, first.text, first.token_ids, first.finish_reason,
                             first.logprobs, seq.prompt_logprobs, request_id=self.request_id, delta=first.delta,
                             finished=self.finished, outputs=outs)


class OutputProcessor:
    def __init__(self, eos_token_ids: list[int], max_model_len: int):
        self.eos = set(eos_token_ids)
        self.max_model_len = max_model_len

    def append(self, state: RequestState, token: int, logprobs: dict[int, float] | None,
               seq: Sequence | None = None) -> str | None:
        """Add a token sampled for `seq` (default: the request's only sequence); return its
        completion's finish reason if it is done now, else None."""
        c = state.completion(seq) if seq is not None else state.completions[0]
        s, p = c.seq, c.seq.params
        s.output_token_ids.append(token)
        if logprobs is not None:
            s.logprobs.append(logprobs)
            c.cumulative_logprob += logprobs[token]
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            if p.include_stop_str_in_output:
                c.text += c.detokenizer.add(token)
            c.text += c.detokenizer.flush()
            c.stop_reason = token if token in p.stop_token_ids else None
            return "stop"
        at_length = len(s.output_token_ids) >= p.max_tokens or s.num_tokens >= self.max_model_len
        searched_from = len(c.text)
        c.text += c.detokenizer.add(token)
        if at_length:
            c.text += c.detokenizer.flush()
        stop, cut = find_stop(c.text, searched_from, p.stop)
        if stop is not None:
            c.text = c.text[:cut + len(stop) if p.include_stop_str_in_output else cut]
            c.stop_reason = stop
            return "stop"
        return "length" if at_length else None


def find_stop(text: str, new_from: int, stops: list[str]) -> tuple[str | None, int]:
    """The first of `stops` (in their order) found in `text` and where it starts, looking only at
    matches that end at or after `new_from`; (None, -1) if none."""
    for stop in stops:
        cut = text.find(stop, max(0, new_from - len(stop) + 1))
        if cut >= 0:
            return stop, cut
    return None, -1

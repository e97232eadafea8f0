"""Output processing: a sampled token appended to its request, the stop checks, and the text.

The stop checks, in order (the same as `LLM.generate` always had):
- an EOS token (unless `ignore_eos`) or one of `stop_token_ids`: "stop"; the token stays in
  `token_ids` but adds no text;
- a stop string in the text: "stop", the text cut where it starts (a string earlier in
  `SamplingParams.stop` wins when several end in the same token). Only the new text and the
  len(stop) - 1 characters before it are searched: any earlier match would have stopped sooner;
- `max_tokens` generated, or the sequence at `max_model_len`: "length".

Streaming: a request with stop strings keeps its last len(longest stop) - 1 characters unsent
until it finishes, so no delta ever shows part of a stop string that is cut away later.
"""

from __future__ import annotations

from typing import Any

from engine.detokenizer import IncrementalDetokenizer
from engine.request_output import RequestOutput
from engine.sequence import Sequence


class RequestState:
    """The output side of one request: its sequence, its text so far, and how much was sent."""

    def __init__(self, request_id: Any, prompt_text: str | None, seq: Sequence, tokenizer):
        self.request_id = request_id
        self.prompt_text = prompt_text
        self.seq = seq
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.text = ""
        self.sent = 0  # characters of `text` already in a delta
        self.hold = max(map(len, seq.params.stop), default=1) - 1

    def output(self) -> RequestOutput:
        """This request's output now: the text not yet sent (less what is held back) as the delta."""
        s, finished = self.seq, self.seq.finish_reason is not None
        end = len(self.text) if finished else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:end], end
        return RequestOutput(self.prompt_text, s.prompt_token_ids, self.text[:end], list(s.output_token_ids),
                             s.finish_reason, list(s.logprobs) if s.params.logprobs is not None else None,
                             s.prompt_logprobs, request_id=self.request_id, delta=delta, finished=finished)


class OutputProcessor:
    def __init__(self, eos_token_ids: list[int], max_model_len: int):
        self.eos = set(eos_token_ids)
        self.max_model_len = max_model_len

    def append(self, state: RequestState, token: int, logprobs: dict[int, float] | None) -> str | None:
        """Add a sampled token; return the finish reason if the request is done now, else None."""
        s, p = state.seq, state.seq.params
        s.output_token_ids.append(token)
        if logprobs is not None:
            s.logprobs.append(logprobs)
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            state.text += state.detokenizer.flush()
            return "stop"
        at_length = len(s.output_token_ids) >= p.max_tokens or s.num_tokens >= self.max_model_len
        searched_from = len(state.text)
        state.text += state.detokenizer.add(token)
        if at_length:
            state.text += state.detokenizer.flush()
        cut = find_stop(state.text, searched_from, p.stop)
        if cut >= 0:
            state.text = state.text[:cut]
            return "stop"
        return "length" if at_length else None


def find_stop(text: str, new_from: int, stops: list[str]) -> int:
    """Where the first of `stops` (in their order) starts in `text`, looking only at matches that
    end at or after `new_from`; -1 if none."""
    for stop in stops:
        cut = text.find(stop, max(0, new_from - len(stop) + 1))
        if cut >= 0:
            return cut
    return -1

"""What the engine hands back for a request: after each step it advanced (streaming), and at the end.

Like vLLM's, a RequestOutput holds `outputs`: one CompletionOutput per completion (SamplingParams.n).
Its own text / token_ids / finish_reason / logprobs / delta are those of the first completion, so
code written for n=1 reads them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str  # all text so far (the final text once finished)
    token_ids: list[int]  # all generated ids so far (a stop token included)
    finish_reason: str | None  # "stop", "length", "abort", or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it (None: EOS, length)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None  # sum of the chosen tokens' logprobs (when logprobs were asked for)
    delta: str = ""  # text new since this completion's previous output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str  # all text so far (the final text once finished)
    token_ids: list[int]  # all generated ids so far (a stop token included)
    finish_reason: str | None  # "stop", "length", or None while running
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    request_id: Any = None
    delta: str = ""  # text new since this request's previous output; the deltas concatenate to `text`
    finished: bool = False  # every completion finished
    outputs: list[CompletionOutput] = field(default_factory=list)

    def __post_init__(self):
        if not self.outputs:  # built from one completion's fields
            self.outputs = [CompletionOutput(0, self.text, self.token_ids, self.finish_reason,
                                             logprobs=self.logprobs, delta=self.delta)]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        """Tokens generated over all completions (a stop token counts, as in OpenAI's usage)."""
        return sum(len(c.token_ids) for c in self.outputs)

    @property
    def usage(self) -> dict[str, int]:
        """The OpenAI usage block: prompt_tokens, completion_tokens, total_tokens."""
        prompt, generated = self.num_prompt_tokens, self.num_generated_tokens
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

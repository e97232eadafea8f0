"""Sampling parameters of a request (the sampler that applies them is engine.sampler).

The fields and their meaning follow vLLM's SamplingParams: `n` completions of one prompt;
penalties on the logits before temperature (repetition_penalty over the prompt's and the output's
tokens, divides a positive logit and multiplies a negative one; frequency_penalty x how often a
token was generated and presence_penalty once it was, subtracted); `stop` strings cut from the
text unless include_stop_str_in_output; `logprobs` of the model's own (raw) distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kernels.errors import InputError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 16
    n: int = 1  # completions of the prompt (each its own sequence)
    temperature: float = 1.0  # 0 → greedy
    top_k: int = -1  # -1 or 0 → off
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability
    repetition_penalty: float = 1.0  # 1 → off; > 1 discourages tokens of the prompt and output
    presence_penalty: float = 0.0  # subtracted from a token's logit once it was generated
    frequency_penalty: float = 0.0  # subtracted per time a token was generated
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (0: the chosen token's only)
    prompt_logprobs: bool = False  # logprob of every prompt token given its prefix

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not isinstance(self.stop, (list, tuple)):
            raise InputError(f"SamplingParams.stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop or [])
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise InputError(f"SamplingParams.stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        checks = [
            (_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1"),
            (_is_int(self.n) and self.n >= 1, "n", "an integer >= 1"),
            (_is_number(self.temperature) and self.temperature >= 0, "temperature", "a finite number >= 0"),
            (_is_int(self.top_k) and self.top_k >= -1, "top_k", "-1 (off) or an integer >= 0"),
            (_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]"),
            (_is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
             "a finite number > 0 (1 is off)"),
            (_is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
             "in [-2, 2]"),
            (_is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
             "in [-2, 2]"),
            # torch.Generator.manual_seed takes 64-bit seeds
            (self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64), "seed",
             "None or an integer in [0, 2**64)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings"),
            (all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "token ids (integers >= 0)"),
            (isinstance(self.include_stop_str_in_output, bool), "include_stop_str_in_output", "True or False"),
            (isinstance(self.ignore_eos, bool), "ignore_eos", "True or False"),
            (self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             "logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]"),
            (isinstance(self.prompt_logprobs, bool), "prompt_logprobs", "True or False"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise InputError(f"SamplingParams.{name} must be {want}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (the sampler then needs the sequence's tokens: PenaltyTokens)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def completion_seed(self, index: int) -> int | None:
        return completion_seed(self.seed, index)


def completion_seed(seed: int | None, index: int) -> int | None:
    """The seed of completion `index` of a request's n: the request's own for the first (so n=1
    draws as it always did), a distinct one derived from it for the others. The engine's `n` and
    the server's per-choice requests both use it, so the same seed gives the same n answers."""
    if seed is None or index == 0:
        return seed
    return (seed + index * 0x9E3779B97F4A7C15) % 2**64  # golden-ratio stride: no two collide


@dataclass
class PenaltyTokens:
    """What the penalised sampler on rank 0 must add to a sequence's token counts this step.

    The driver owns the truth (the sequence's prompt and output ids); the sampler keeps counts as a
    cache. `prompt` set: start over (a new sequence, or one whose sampler state may be gone, e.g.
    after preemption) and count the prompt and every output id so far. Otherwise `output` holds
    the output ids generated since the last update; `start` is their index in the output, which
    the sampler checks against what it has counted."""

    start: int
    output: list[int]
    prompt: list[int] | None = None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

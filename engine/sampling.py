"""Sampling parameters of a request (the sampler that applies them is engine.sampler)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kernels.errors import InputError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 → greedy
    top_k: int = -1  # -1 or 0 → off
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
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
            (_is_number(self.temperature) and self.temperature >= 0, "temperature", "a finite number >= 0"),
            (_is_int(self.top_k) and self.top_k >= -1, "top_k", "-1 (off) or an integer >= 0"),
            (_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]"),
            # torch.Generator.manual_seed takes 64-bit seeds
            (self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64), "seed",
             "None or an integer in [0, 2**64)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings"),
            (all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "token ids (integers >= 0)"),
            (isinstance(self.ignore_eos, bool), "ignore_eos", "True or False"),
            (self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
             "logprobs", "None or an integer in [0, 20]"),
            (isinstance(self.prompt_logprobs, bool), "prompt_logprobs", "True or False"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise InputError(f"SamplingParams.{name} must be {want}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

"""Sampling parameters and the sampler (run on rank 0, over the full vocabulary)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 → greedy
    top_k: int = -1  # -1 or 0 → off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (0: the chosen token's only)
    prompt_logprobs: bool = False  # logprob of every prompt token given its prefix

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "an integer >= 1"),
            (isinstance(self.temperature, (int, float)) and self.temperature >= 0, "temperature", "a number >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "-1 (off) or an integer >= 0"),
            (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (self.seed is None or isinstance(self.seed, int), "seed", "an integer or None"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "logprobs", "None or an integer in [0, 20]"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {want}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks the next token of each sequence; seeded requests get their own generator."""

    def __init__(self, seed: int = 0):
        self.default_generator = torch.Generator().manual_seed(seed)
        self.generators: dict[int, torch.Generator] = {}

    def forget(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)

    def sample(self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams]):
        """logits [B, V] → (token ids [B], per-sequence logprob dicts or None)."""
        logits = logits.float().cpu()
        tokens = logits.argmax(dim=-1)
        for row, (seq_id, p) in enumerate(zip(seq_ids, params)):
            if not p.greedy:
                tokens[row] = self._draw(logits[row], p, self._generator(seq_id, p))
        logprobs = None
        if any(p.logprobs is not None for p in params):
            lp = torch.log_softmax(logits, dim=-1)
            logprobs = []
            for row, p in enumerate(params):
                if p.logprobs is None:
                    logprobs.append(None)
                    continue
                chosen = int(tokens[row])
                entry = {chosen: float(lp[row, chosen])}
                if p.logprobs:
                    top = lp[row].topk(p.logprobs)
                    entry.update({int(t): float(v) for t, v in zip(top.indices, top.values)})
                logprobs.append(entry)
        return tokens.tolist(), logprobs

    def _generator(self, seq_id: int, p: SamplingParams) -> torch.Generator:
        if p.seed is None:
            return self.default_generator
        if seq_id not in self.generators:
            self.generators[seq_id] = torch.Generator().manual_seed(p.seed)
        return self.generators[seq_id]

    @staticmethod
    def _draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = logits.topk(p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # keep the smallest prefix whose mass reaches top_p (the top token always stays)
            drop = cumulative - sorted_logits.softmax(-1) >= p.top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=generator))

"""The per-row CPU sampler, kept as the reference the device sampler (engine.sampler) is tested against.

One row at a time, in float32 on the CPU: penalties on the raw logits (from each sequence's token
lists, kept here as plain lists and counted token by token), then temperature, top-k, top-p over
what top-k kept, min-p, then `torch.multinomial`. Slow (a host copy and a few kernels per row), exact.
"""

from __future__ import annotations

from collections import Counter

import torch

from engine.sampling import PenaltyTokens, SamplingParams


def reference_penalize(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """One row's raw logits [V] (float32) with p's penalties applied, token by token: every token of
    the prompt or output has its logit divided by repetition_penalty when positive, multiplied when
    not; each generated token then loses frequency_penalty per occurrence and presence_penalty once."""
    logits = logits.float().clone()
    one = torch.ones((), dtype=torch.float32)
    rep, freq, pres = (one * p.repetition_penalty, one * p.frequency_penalty, one * p.presence_penalty)
    for t in set(prompt) | set(output):
        logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
    for t, count in Counter(output).items():
        logits[t] = logits[t] - freq * count - pres
    return logits


def reference_filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row's temperature-scaled logits [V] with every token the parameters drop set to -inf."""
    logits = logits.float() / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = logits.topk(p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= p.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def reference_draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """One token drawn from one row of logits [V] (CPU) under non-greedy parameters `p`."""
    return int(torch.multinomial(reference_filter(logits, p).softmax(-1), 1, generator=generator))


class HostSample:
    """A sample already on the host, with its tokens on the logits' device too (as DeviceSample)."""

    def __init__(self, tokens: torch.Tensor, result: tuple):
        self.tokens, self._result = tokens, result

    def to_host(self) -> tuple:
        return self._result


class ReferenceSampler:
    """The CPU sampler the engine used before sampling moved to the device (same interface)."""

    def __init__(self, seed: int = 0):
        self.default_generator = torch.Generator().manual_seed(seed)
        self.generators: dict[int, torch.Generator] = {}
        self.tokens: dict[int, tuple[list[int], list[int]]] = {}  # (prompt, output) of penalised sequences

    def forget(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)
        self.tokens.pop(seq_id, None)

    def sample_on_device(self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams],
                         penalties: list[PenaltyTokens | None] | None = None) -> "HostSample":
        """The device sampler's interface (engine.sampler.DeviceSample): sampled here, at once."""
        tokens, logprobs = self.sample(logits, seq_ids, params, penalties)
        return HostSample(torch.tensor(tokens, dtype=torch.long, device=logits.device), (tokens, logprobs))

    def sample(self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams],
               penalties: list[PenaltyTokens | None] | None = None):
        """logits [B, V] → (token ids [B], per-sequence logprob dicts or None)."""
        logits = logits.float().cpu()
        raw = logits
        if any(p.penalized for p in params):
            logits = logits.clone()
            for row, (seq_id, p) in enumerate(zip(seq_ids, params)):
                if p.penalized:
                    prompt, output = self._tokens(seq_id, penalties[row])
                    logits[row] = reference_penalize(logits[row], p, prompt, output)
        tokens = logits.argmax(dim=-1)
        for row, (seq_id, p) in enumerate(zip(seq_ids, params)):
            if not p.greedy:
                tokens[row] = reference_draw(logits[row], p, self._generator(seq_id, p))
        logits = raw  # logprobs are the raw model's
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

    def _tokens(self, seq_id: int, u: PenaltyTokens) -> tuple[list[int], list[int]]:
        if u.prompt is not None:
            self.tokens[seq_id] = (list(u.prompt), [])
        prompt, output = self.tokens[seq_id]
        assert u.start == len(output), (seq_id, u.start, len(output))
        output.extend(u.output)
        return prompt, output

    def _generator(self, seq_id: int, p: SamplingParams) -> torch.Generator:
        if p.seed is None:
            return self.default_generator
        if seq_id not in self.generators:
            self.generators[seq_id] = torch.Generator().manual_seed(p.seed)
        return self.generators[seq_id]

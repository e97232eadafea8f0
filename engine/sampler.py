"""The sampler: picks each sequence's next token on the logits' own device (rank 0, whole vocabulary).

All rows of a step are sampled together, each under its own parameters (per-row temperature,
top-k, top-p and min-p tensors; greedy rows take the argmax). Filters run in the order of the
reference sampler (engine.sampling_reference): temperature, top-k, top-p over what top-k kept,
min-p. A row draws by the exponential race: with q_i ~ Exp(1) drawn for every token of the
vocabulary, argmax_i p_i / q_i is distributed exactly as p, and in logs (argmax of
logit_i / T - log q_i) the softmax's normalisation never has to be computed. A seeded request
draws its q from its own device generator, always V values a step, so its tokens do not depend
on which other rows share its batch.

Only the chosen token ids (and the asked-for logprobs) come back to the host: one copy per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class RowParams:
    """Per-row filter parameters of the rows that sample, on the logits' device."""

    temperature: torch.Tensor  # [n] float32
    top_k: torch.Tensor  # [n] long, the vocabulary size where top-k is off
    top_p: torch.Tensor  # [n] float32, 1 where off
    min_p: torch.Tensor  # [n] float32, 0 where off
    width: int  # tokens kept after top-k in the widest row (V when any row has top-k off)
    filtered: bool  # whether any row filters at all (else the race runs over the whole vocabulary)
    uses_top_k: bool
    uses_top_p: bool
    uses_min_p: bool

    @classmethod
    def build(cls, params: list[SamplingParams], vocab_size: int, device: torch.device) -> "RowParams":
        ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        table = torch.tensor([[p.temperature, p.top_p, p.min_p] for p in params], dtype=torch.float32)
        ks_t = torch.tensor(ks, dtype=torch.long)
        if device.type == "cuda":  # pinned, so the copies do not wait for the GPU
            table, ks_t = table.pin_memory(), ks_t.pin_memory()
        table, ks_t = table.to(device, non_blocking=True), ks_t.to(device, non_blocking=True)
        uses_top_k = any(k < vocab_size for k in ks)
        uses_top_p = any(p.top_p < 1.0 for p in params)
        uses_min_p = any(p.min_p > 0.0 for p in params)
        return cls(table[:, 0], ks_t, table[:, 1], table[:, 2], max(ks), uses_top_k or uses_top_p or uses_min_p,
                   uses_top_k, uses_top_p, uses_min_p)


def filter_sorted(scaled: torch.Tensor, rows: RowParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, token ids, keep) of each row's best `rows.width` tokens, best first: keep marks the
    tokens top-k, top-p and min-p leave to draw from. scaled: [n, V] temperature-scaled logits."""
    if rows.width < scaled.shape[-1]:
        values, ids = scaled.topk(rows.width, dim=-1)
    else:
        values, ids = scaled.sort(dim=-1, descending=True)
    keep = torch.ones_like(values, dtype=torch.bool)
    if rows.uses_top_k:  # everything tied with the k-th value stays, as in the reference
        kth = values.gather(1, (rows.top_k.clamp(max=rows.width) - 1)[:, None])
        keep &= values >= kth
    if rows.uses_top_p:
        probs = values.masked_fill(~keep, _NEG_INF).softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the better tokens: keep until it reaches top_p
        keep &= (before < rows.top_p[:, None]) | (rows.top_p[:, None] >= 1.0)
    if rows.uses_min_p:
        probs = values.masked_fill(~keep, _NEG_INF).softmax(-1)
        keep &= probs >= rows.min_p[:, None] * probs[:, :1]
    return values, ids, keep


def allowed_tokens(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[B, V] bool: the tokens each (non-greedy) row may draw under its parameters."""
    rows = RowParams.build(params, logits.shape[-1], logits.device)
    _, ids, keep = filter_sorted(logits.float() / rows.temperature[:, None], rows)
    return torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, ids, keep)


class Sampler:
    """Samples every row of a step on the logits' device; seeded requests get their own generator."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.default_generators: dict[torch.device, torch.Generator] = {}
        self.generators: dict[int, torch.Generator] = {}
        self._rows_key: tuple | None = None  # the last step's row parameters, reused while they repeat
        self._rows: RowParams | None = None
        self._rows_index: torch.Tensor | None = None

    def forget(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)

    def sample(self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams]):
        """logits [B, V] (any device) → (token ids [B], per-sequence logprob dicts or None)."""
        tokens = logits.argmax(dim=-1)  # before any cast: 16-bit to float32 is exact, so the same argmax
        drawing = [i for i, p in enumerate(params) if not p.greedy]
        if drawing or any(p.logprobs is not None for p in params):
            logits = logits.float()
        if drawing:
            rows, index = self._row_params(logits, drawing, params)
            sub = logits if index is None else logits.index_select(0, index)
            noise = self._exponentials(sub.shape, logits.device, [seq_ids[i] for i in drawing],
                                       [params[i] for i in drawing])
            drawn = race(sub, rows, noise)
            tokens = drawn if index is None else tokens.index_copy(0, index, drawn)
        return self._to_host(logits, tokens, params)

    def _row_params(self, logits: torch.Tensor, drawing: list[int], params: list[SamplingParams]):
        """Per-row tensors of the drawing rows and their row index (None: all rows draw)."""
        vocab = logits.shape[-1]
        key = (logits.device, vocab, len(params), tuple(drawing),
               tuple((params[i].temperature, params[i].top_k, params[i].top_p, params[i].min_p) for i in drawing))
        if key != self._rows_key:
            self._rows = RowParams.build([params[i] for i in drawing], vocab, logits.device)
            index = None
            if len(drawing) < len(params):
                index = torch.tensor(drawing, dtype=torch.long)
                if logits.device.type == "cuda":
                    index = index.pin_memory()
                index = index.to(logits.device, non_blocking=True)
            self._rows_key, self._rows_index = key, index
        return self._rows, self._rows_index

    def _exponentials(self, shape: torch.Size, device: torch.device, seq_ids: list[int],
                      params: list[SamplingParams]) -> torch.Tensor:
        """q ~ Exp(1), [n, V]: each seeded row from its own generator, the rest from the default one."""
        noise = torch.empty(shape, dtype=torch.float32, device=device)
        if all(p.seed is None for p in params):
            noise.exponential_(generator=self._default(device))
        else:
            for row, (seq_id, p) in enumerate(zip(seq_ids, params)):
                noise[row].exponential_(generator=self._generator(seq_id, p, device))
        return noise

    def _default(self, device: torch.device) -> torch.Generator:
        if device not in self.default_generators:
            self.default_generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.default_generators[device]

    def _generator(self, seq_id: int, p: SamplingParams, device: torch.device) -> torch.Generator:
        if p.seed is None:
            return self._default(device)
        gen = self.generators.get(seq_id)
        if gen is None or gen.device != device:
            gen = self.generators[seq_id] = torch.Generator(device=device).manual_seed(p.seed)
        return gen

    @staticmethod
    def _to_host(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]):
        """The step's one device-to-host copy: token ids, and the logprobs asked for."""
        if all(p.logprobs is None for p in params):
            return tokens.tolist(), None
        lp = torch.log_softmax(logits, dim=-1)
        columns = [tokens[:, None].double(), lp.gather(1, tokens[:, None]).double()]
        top_n = max(p.logprobs or 0 for p in params)
        if top_n:
            top = lp.topk(top_n, dim=-1)
            columns += [top.indices.double(), top.values.double()]  # token ids < 2^53: exact in float64
        table = torch.cat(columns, dim=1).tolist()
        out_tokens, logprobs = [], []
        for row, p in zip(table, params):
            chosen = int(row[0])
            out_tokens.append(chosen)
            if p.logprobs is None:
                logprobs.append(None)
                continue
            entry = {chosen: row[1]}
            entry.update({int(t): v for t, v in zip(row[2:2 + p.logprobs], row[2 + top_n:2 + top_n + p.logprobs])})
            logprobs.append(entry)
        return out_tokens, logprobs


def race(logits: torch.Tensor, rows: RowParams, noise: torch.Tensor) -> torch.Tensor:
    """Token ids [n] drawn by the exponential race from each row's filtered distribution; noise is
    q ~ Exp(1) of shape [n, V], indexed by token id (so a row's draw does not depend on `rows.width`)."""
    scaled = logits / rows.temperature[:, None]
    # -log q: a Gumbel; q is clamped off 0, which Exp(1) reaches with probability ~0 but float rounding can
    gumbel = noise.clamp_min(torch.finfo(torch.float32).tiny).log_().neg_()
    if not rows.filtered:
        return (scaled + gumbel).argmax(dim=-1)
    values, ids, keep = filter_sorted(scaled, rows)
    score = (values + gumbel.gather(1, ids)).masked_fill(~keep, _NEG_INF)
    return ids.gather(1, score.argmax(dim=-1, keepdim=True)).squeeze(1)

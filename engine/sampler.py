"""The sampler: picks each sequence's next token on the logits' own device (rank 0, whole vocabulary).

All rows of a step are sampled together, each under its own parameters (per-row temperature,
top-k, top-p and min-p tensors; greedy rows take the argmax). Filters run in the order of the
reference sampler (engine.sampling_reference): temperature, top-k, top-p over what top-k kept,
min-p. A row draws by the exponential race: with q_i ~ Exp(1) drawn for every token of the
vocabulary, argmax_i p_i / q_i is distributed exactly as p, and in logs (argmax of
logit_i / T - log q_i) the softmax's normalisation never has to be computed. A seeded request
draws its q from its own device generator, always V values a step, so its tokens do not depend
on which other rows share its batch.

Penalties (repetition, presence, frequency) change the raw logits of the rows that ask for them
before anything else, greedy rows included, from per-sequence token counts kept on the device
(PenaltyCounts: one row of a [rows, V] buffer per sequence, updated each step from the driver's
PenaltyTokens). Logprobs are those of the raw logits, before penalties and temperature (vLLM's
default).

Only the chosen token ids (and the asked-for logprobs) come back to the host: one copy per step,
queued behind the sampling (DeviceSample), so the next step can be launched before it is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling import PenaltyTokens, SamplingParams
from kernels.errors import QShardError

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


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor,
                    penalties: torch.Tensor) -> torch.Tensor:
    """Penalised logits [n, V] (float32). counts [n, V]: times each token was generated; in_prompt
    [n, V] bool; penalties [n, 3]: repetition, frequency, presence of each row. A token of the prompt
    or the output has its logit divided by the repetition penalty if positive, else multiplied; then
    frequency x count and presence x (count > 0) are subtracted."""
    repetition, frequency, presence = penalties[:, 0:1], penalties[:, 1:2], penalties[:, 2:3]
    generated = counts > 0
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(generated | in_prompt, repeated, logits)
    return logits - frequency * counts.to(logits.dtype) - presence * generated.to(logits.dtype)


class PenaltyCounts:
    """Each penalised sequence's token counts on the device: its row of `counts` (output tokens)
    and `in_prompt` (prompt tokens), both [rows, V]. The driver's PenaltyTokens keep them current;
    a row is reused once its sequence is forgotten."""

    def __init__(self):
        self.row_of: dict[int, int] = {}
        self.counted: dict[int, int] = {}  # output tokens counted so far, by sequence
        self.free_rows: list[int] = []
        self.counts: torch.Tensor | None = None  # [rows, V] int32
        self.in_prompt: torch.Tensor | None = None  # [rows, V] bool

    def forget(self, seq_id: int) -> None:
        row = self.row_of.pop(seq_id, None)
        self.counted.pop(seq_id, None)
        if row is not None:
            self.free_rows.append(row)

    def update(self, seq_ids: list[int], updates: list[PenaltyTokens | None], vocab: int,
               device: torch.device) -> torch.Tensor:
        """Count this step's new tokens; return the sequences' rows [n] on the device."""
        reset, prompt_at, output_at = [], ([], []), ([], [])
        for seq_id, u in zip(seq_ids, updates):
            if u is None:
                raise QShardError(f"sequence {seq_id} has penalties but its step carries no PenaltyTokens")
            if u.prompt is not None:
                if u.start != 0:
                    raise QShardError(f"sequence {seq_id}: a penalty restart counts the output from 0, "
                                      f"not from {u.start}")
                reset.append(self._row(seq_id))
                prompt_at[0].extend([self.row_of[seq_id]] * len(u.prompt))
                prompt_at[1].extend(u.prompt)
                self.counted[seq_id] = 0
            elif self.counted.get(seq_id) != u.start:
                raise QShardError(f"sequence {seq_id}: the sampler counted {self.counted.get(seq_id)} output "
                                  f"tokens but the update starts at {u.start} (a sequence whose counts "
                                  f"may be gone must resend its prompt)")
            output_at[0].extend([self.row_of[seq_id]] * len(u.output))
            output_at[1].extend(u.output)
            self.counted[seq_id] += len(u.output)
        self._reserve(len(self.row_of) + len(self.free_rows), vocab, device)
        rows = [self.row_of[s] for s in seq_ids]
        sizes = [len(rows), len(reset), len(prompt_at[0]), len(prompt_at[0]), len(output_at[0]), len(output_at[0])]
        flat = torch.tensor(rows + reset + prompt_at[0] + prompt_at[1] + output_at[0] + output_at[1], dtype=torch.long)
        if device.type == "cuda":
            flat = flat.pin_memory()
        rows_t, reset_t, prompt_rows, prompt_ids, out_rows, out_ids = flat.to(device, non_blocking=True).split(sizes)
        if reset:
            self.counts.index_fill_(0, reset_t, 0)
            self.in_prompt.index_fill_(0, reset_t, False)
        if prompt_at[0]:
            self.in_prompt.index_put_((prompt_rows, prompt_ids), torch.ones((), dtype=torch.bool, device=device))
        if output_at[0]:
            self.counts.index_put_((out_rows, out_ids), torch.ones((), dtype=torch.int32, device=device),
                                   accumulate=True)
        return rows_t

    def _row(self, seq_id: int) -> int:
        if seq_id not in self.row_of:
            self.row_of[seq_id] = self.free_rows.pop() if self.free_rows else len(self.row_of) + len(self.free_rows)
        return self.row_of[seq_id]

    def _reserve(self, rows: int, vocab: int, device: torch.device) -> None:
        """Room for `rows` rows (doubling, old counts kept)."""
        have = 0 if self.counts is None else self.counts.shape[0]
        if self.counts is not None and (self.counts.shape[1] != vocab or self.counts.device != device):
            raise QShardError(f"penalty counts are for {self.counts.shape[1]} tokens on {self.counts.device}, "
                              f"the logits have {vocab} on {device}")
        if rows <= have:
            return
        size = max(rows, 2 * have, 8)
        counts = torch.zeros((size, vocab), dtype=torch.int32, device=device)
        in_prompt = torch.zeros((size, vocab), dtype=torch.bool, device=device)
        if have:
            counts[:have], in_prompt[:have] = self.counts, self.in_prompt
        self.counts, self.in_prompt = counts, in_prompt


class Sampler:
    """Samples every row of a step on the logits' device; seeded requests get their own generator."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.default_generators: dict[torch.device, torch.Generator] = {}
        self.generators: dict[int, torch.Generator] = {}
        self.penalty_counts = PenaltyCounts()
        self._rows_key: tuple | None = None  # the last step's row parameters, reused while they repeat
        self._rows: RowParams | None = None
        self._rows_index: torch.Tensor | None = None
        self._penalty_key: tuple | None = None  # likewise for the penalised rows' parameters
        self._penalty_params: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def forget(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)
        self.penalty_counts.forget(seq_id)

    def sample(self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams],
               penalties: list[PenaltyTokens | None] | None = None):
        """logits [B, V] (any device) → (token ids [B], per-sequence logprob dicts or None).
        penalties: each row's PenaltyTokens (None for rows without penalties; the list may be None
        when no row has any)."""
        return self.sample_on_device(logits, seq_ids, params, penalties).to_host()

    def sample_on_device(self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams],
                         penalties: list[PenaltyTokens | None] | None = None) -> "DeviceSample":
        """As sample(), without waiting: the tokens stay on the device (a next step may read them
        there) and their copy to the host is under way; `to_host()` waits for it."""
        raw = logits
        penalized = [i for i, p in enumerate(params) if p.penalized]
        if penalized:
            logits = self._penalize(logits.float(), penalized, seq_ids, params, penalties)
        tokens = logits.argmax(dim=-1)  # before any cast: 16-bit to float32 is exact, so the same argmax
        drawing = [i for i, p in enumerate(params) if not p.greedy]
        if any(p.logprobs is not None for p in params):
            raw = raw.float()
        if drawing:
            logits = logits.float()
            rows, index = self._row_params(logits, drawing, params)
            sub = logits if index is None else logits.index_select(0, index)
            noise = self._exponentials(sub.shape, logits.device, [seq_ids[i] for i in drawing],
                                       [params[i] for i in drawing])
            drawn = race(sub, rows, noise)
            tokens = drawn if index is None else tokens.index_copy(0, index, drawn)
        return DeviceSample(raw, tokens, params)

    def _penalize(self, logits: torch.Tensor, penalized: list[int], seq_ids: list[int],
                  params: list[SamplingParams], penalties: list[PenaltyTokens | None] | None) -> torch.Tensor:
        """The logits with the penalised rows' penalties applied (a new tensor: the raw logits stay)."""
        if penalties is None:
            raise QShardError(f"sequence {seq_ids[penalized[0]]} has penalties but the step carries no "
                              f"PenaltyTokens")
        rows = self.penalty_counts.update([seq_ids[i] for i in penalized], [penalties[i] for i in penalized],
                                          logits.shape[-1], logits.device)
        values, index = self._penalty_tensors(logits.device, len(params), penalized, params)
        sub = logits if index is None else logits.index_select(0, index)
        counts = self.penalty_counts
        sub = apply_penalties(sub, counts.counts.index_select(0, rows), counts.in_prompt.index_select(0, rows), values)
        return sub if index is None else logits.index_copy(0, index, sub)

    def _penalty_tensors(self, device: torch.device, batch: int, penalized: list[int], params: list[SamplingParams]):
        """[n, 3] penalties of the penalised rows and their row index (None: every row), cached."""
        key = (device, batch, tuple(penalized), tuple((params[i].repetition_penalty, params[i].frequency_penalty,
                                                       params[i].presence_penalty) for i in penalized))
        if key != self._penalty_key:
            values = torch.tensor([list(k) for k in key[3]], dtype=torch.float32)
            index = torch.tensor(penalized, dtype=torch.long) if len(penalized) < batch else None
            if device.type == "cuda":
                values = values.pin_memory()
                index = index.pin_memory() if index is not None else None
            values = values.to(device, non_blocking=True)
            index = index.to(device, non_blocking=True) if index is not None else None
            self._penalty_key, self._penalty_params = key, (values, index)
        return self._penalty_params

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


class DeviceSample:
    """One step's sampled tokens (and asked-for logprobs), made on the logits' device. Everything the
    host needs is computed at once into one tensor, whose copy to pinned host memory is queued
    behind the sampling kernels: the logits may be overwritten (a CUDA graph's next replay) and the
    next step launched before `to_host()` waits for the copy, the step's one synchronisation."""

    def __init__(self, logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]):
        self.tokens = tokens  # [B] long, on the device
        self.params = params
        self.top_n = max((p.logprobs or 0) for p in params) if params else 0
        if all(p.logprobs is None for p in params):
            table = tokens
        else:
            lp = torch.log_softmax(logits, dim=-1)
            columns = [tokens[:, None].double(), lp.gather(1, tokens[:, None]).double()]
            if self.top_n:
                top = lp.topk(self.top_n, dim=-1)
                columns += [top.indices.double(), top.values.double()]  # token ids < 2^53: exact in float64
            table = torch.cat(columns, dim=1)
        self._event = None
        if table.is_cuda:
            host = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
            host.copy_(table, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            table = host
        self._table = table
        self._result = None

    def to_host(self) -> tuple[list[int], list[dict[int, float] | None] | None]:
        """(token ids, per-sequence logprob dicts or None), waiting for the copy if needed."""
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()
            self._result = self._unpack(self._table.tolist())
        return self._result

    def _unpack(self, table: list):
        params, top_n = self.params, self.top_n
        if all(p.logprobs is None for p in params):
            return table, None
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

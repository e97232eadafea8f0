"""What one forward step computes: the new tokens of several sequences, flattened.

Sequence i contributes query_lens[i] consecutive tokens at positions context_lens[i] onward; its
keys and values live in cache slot slots[i]. Decode sequences (one new token) are attended to
together; sequences with several new tokens (prefill) one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    token_slots: torch.Tensor  # [T] long: cache slot of each token
    slots: list[int]
    query_lens: list[int]
    context_lens: list[int]
    logits_index: torch.Tensor | None  # tokens whose logits are computed (last of each, or all); None: every token
    last_logit_row: torch.Tensor  # [B] long: row of each sequence's last token in those logits
    logit_rows: list[slice]  # rows of each sequence's tokens in those logits
    # decode sequences, attended to as one batch
    decode_seq_index: list[int]
    decode_token_index: torch.Tensor  # [Bd] long
    decode_slots: torch.Tensor  # [Bd] long
    decode_kv_lens: torch.Tensor  # [Bd] long, after this step
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, L] bool, None when every length is equal
    decode_slot_range: tuple[int, int] | None  # (first, count) when the slots are consecutive
    prefill_seq_index: list[int]
    token_starts: list[int]

    @property
    def num_tokens(self) -> int:
        return self.token_ids.numel()

    @property
    def all_decode(self) -> bool:
        return not self.prefill_seq_index

    @classmethod
    def build(cls, token_ids: list[list[int]], context_lens: list[int], slots: list[int],
              device: torch.device, all_logits: list[bool] | None = None) -> "ForwardBatch":
        query_lens = [len(t) for t in token_ids]
        starts, total = [], 0
        for n in query_lens:
            starts.append(total)
            total += n
        flat = [t for seq in token_ids for t in seq]
        positions = [c + j for c, n in zip(context_lens, query_lens) for j in range(n)]
        token_slots = [s for s, n in zip(slots, query_lens) for _ in range(n)]
        # Decode sequences in slot order: their cache slots then form one strided view.
        decode = sorted((i for i, n in enumerate(query_lens) if n == 1), key=lambda i: slots[i])
        prefill = [i for i, n in enumerate(query_lens) if n != 1]
        kv_lens = [context_lens[i] + 1 for i in decode]
        mask = None
        if decode and min(kv_lens) != max(kv_lens):
            lens = torch.tensor(kv_lens)
            mask = (torch.arange(max(kv_lens))[None, :] < lens[:, None])[:, None, None, :].to(device)
        dslots = [slots[i] for i in decode]
        slot_range = None
        if dslots and dslots == list(range(dslots[0], dslots[0] + len(dslots))):
            slot_range = (dslots[0], len(dslots))
        logits_index, logit_rows, last_rows = [], [], []
        for i, (s, n) in enumerate(zip(starts, query_lens)):
            first = len(logits_index)
            logits_index.extend(range(s, s + n) if all_logits and all_logits[i] else [s + n - 1])
            logit_rows.append(slice(first, len(logits_index)))
            last_rows.append(len(logits_index) - 1)
        long = dict(dtype=torch.long, device=device)
        return cls(
            token_ids=torch.tensor(flat, **long), positions=torch.tensor(positions, **long),
            token_slots=torch.tensor(token_slots, **long), slots=list(slots), query_lens=query_lens,
            context_lens=list(context_lens),
            logits_index=torch.tensor(logits_index, **long), last_logit_row=torch.tensor(last_rows, **long),
            logit_rows=logit_rows,
            decode_seq_index=decode, decode_token_index=torch.tensor([starts[i] for i in decode], **long),
            decode_slots=torch.tensor(dslots, **long), decode_kv_lens=torch.tensor(kv_lens, **long),
            decode_mask=mask, decode_slot_range=slot_range, prefill_seq_index=prefill, token_starts=starts,
        )

    @classmethod
    def decode_view(cls, token_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                    kv_lens: torch.Tensor) -> "ForwardBatch":
        """A decode-only batch over caller-owned tensors (the static buffers of a CUDA graph).
        Only the tensor fields are read on the GPU decode path."""
        n = token_ids.numel()
        rows = torch.arange(n, dtype=torch.long, device=token_ids.device)
        return cls(
            token_ids=token_ids, positions=positions, token_slots=slots, slots=[], query_lens=[1] * n,
            context_lens=[1] * n, logits_index=None, last_logit_row=rows, logit_rows=[slice(i, i + 1) for i in range(n)],
            decode_seq_index=list(range(n)), decode_token_index=rows, decode_slots=slots, decode_kv_lens=kv_lens,
            decode_mask=None, decode_slot_range=None, prefill_seq_index=[], token_starts=list(range(n)),
        )

"""What one forward step computes: the new tokens of several sequences, flattened.

Sequence i contributes query_lens[i] consecutive tokens at positions context_lens[i] onward; its
keys and values live in the paged cache's blocks listed by its block table (position p in block
table[p // block_size] at offset p % block_size). Decode sequences (one new token) are attended
to together; sequences with several new tokens (prefill, or a chunk of one) one at a time.

The tensors that depend on the cache's block size are made once per step, by the first layer
that attends (`bind`); a caller driving the model directly may give slot numbers instead of
block tables, which then read fixed blocks (engine.kv_cache.KVCache.reserve).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeBucket:
    token_rows: torch.Tensor  # [b] long: the bucket's decode tokens' rows in the step
    tables: torch.Tensor  # [b, w] int32: their block tables, cut to the bucket's width
    mask: torch.Tensor | None  # [b, 1, 1, w * block_size] bool: positions within each length (None: all)
    everyone: bool  # the bucket holds every decode sequence


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    query_lens: list[int]
    context_lens: list[int]
    logits_index: torch.Tensor | None  # tokens whose logits are computed (last of each, or all); None: every token
    last_logit_row: torch.Tensor  # [B] long: row of each sequence's last token in those logits
    logit_rows: list[slice]  # rows of each sequence's tokens in those logits
    decode_seq_index: list[int]
    decode_token_index: torch.Tensor  # [Bd] long
    prefill_seq_index: list[int]
    token_starts: list[int]
    block_tables: list[list[int]] | None  # host tables (None: slot numbers in `slots`, or bound already)
    slots: list[int] | None = None
    device: torch.device | None = None
    # -- made by bind(cache) --------------------------------------------------------------------
    block_size: int = 0
    token_blocks: torch.Tensor | None = None  # [T] long: block of each new token's position
    token_offsets: torch.Tensor | None = None  # [T] long: its offset in the block
    tables: torch.Tensor | None = None  # [B, W] int32, rows padded with block 0
    decode_tables: torch.Tensor | None = None  # [Bd, W'] int32
    decode_kv_lens: torch.Tensor | None = None  # [Bd] int32, after this step
    decode_width: int = 0  # blocks covering the longest decode sequence (host; 0 when unknown)
    _decode_buckets: list["DecodeBucket"] | None = None  # see decode_buckets() (CPU path)
    cache_rows: torch.Tensor | None = None  # [T * Hkv] flat cache rows of the new keys (torch path, first store)

    def clear_step_cache(self) -> None:
        """Forget the tensors derived lazily during a forward (a CUDA graph's static batch runs many
        steps over the same buffers: they must be derived again inside the captured forward)."""
        self.cache_rows = None
        self._decode_buckets = None

    @property
    def num_tokens(self) -> int:
        return self.token_ids.numel()

    @property
    def all_decode(self) -> bool:
        return not self.prefill_seq_index

    @property
    def bound(self) -> bool:
        return self.token_blocks is not None

    @classmethod
    def build(cls, token_ids: list[list[int]], context_lens: list[int], block_tables: list[list[int]] | list[int],
              device: torch.device, all_logits: list[bool] | None = None) -> "ForwardBatch":
        """block_tables: each sequence's blocks (at least those its positions up to this step's
        last reach), or slot numbers (ints) for the cache's fixed tables."""
        query_lens = [len(t) for t in token_ids]
        starts, total = [], 0
        for n in query_lens:
            starts.append(total)
            total += n
        flat = [t for seq in token_ids for t in seq]
        positions = [c + j for c, n in zip(context_lens, query_lens) for j in range(n)]
        decode = [i for i, n in enumerate(query_lens) if n == 1]
        prefill = [i for i, n in enumerate(query_lens) if n != 1]
        logits_index, logit_rows, last_rows = [], [], []
        for i, (s, n) in enumerate(zip(starts, query_lens)):
            first = len(logits_index)
            logits_index.extend(range(s, s + n) if all_logits and all_logits[i] else [s + n - 1])
            logit_rows.append(slice(first, len(logits_index)))
            last_rows.append(len(logits_index) - 1)
        slots = None
        tables = [list(t) for t in block_tables] if block_tables and not isinstance(block_tables[0], int) else None
        if tables is None:
            slots, tables = list(block_tables), None
        long = dict(dtype=torch.long, device=device)
        return cls(
            token_ids=torch.tensor(flat, **long), positions=torch.tensor(positions, **long),
            query_lens=query_lens, context_lens=list(context_lens),
            logits_index=torch.tensor(logits_index, **long), last_logit_row=torch.tensor(last_rows, **long),
            logit_rows=logit_rows, decode_seq_index=decode,
            decode_token_index=torch.tensor([starts[i] for i in decode], **long),
            prefill_seq_index=prefill, token_starts=starts, block_tables=tables, slots=slots, device=device,
        )

    def bind(self, cache) -> "ForwardBatch":
        """Make the block-size-dependent tensors for `cache` (once; later calls return at once)."""
        if self.bound:
            return self
        tables = self.block_tables if self.block_tables is not None else cache.slot_tables(self.slots)
        bs, device = cache.block_size, self.device
        blocks, offsets = [], []
        for table, c, n in zip(tables, self.context_lens, self.query_lens):
            for p in range(c, c + n):
                blocks.append(table[p // bs])
                offsets.append(p % bs)
        width = max((len(t) for t in tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in tables]
        long = dict(dtype=torch.long, device=device)
        self.block_size = bs
        self.token_blocks, self.token_offsets = torch.tensor(blocks, **long), torch.tensor(offsets, **long)
        self.tables = torch.tensor(padded, dtype=torch.int32, device=device).view(len(tables), width)
        kv_lens = [self.context_lens[i] + 1 for i in self.decode_seq_index]
        self.decode_width = -(-max(kv_lens, default=0) // bs)
        index = torch.tensor(self.decode_seq_index, **long)
        self.decode_tables = self.tables.index_select(0, index)[:, :self.decode_width]
        self.decode_kv_lens = torch.tensor(kv_lens, dtype=torch.int32, device=device)
        return self

    def decode_buckets(self) -> list["DecodeBucket"]:
        """The decode sequences in groups of similar length, for attention that pads each group to
        its longest member (the torch path): widths in blocks are rounded up to a power of two, so
        no sequence is padded to more than twice its length, however mixed the batch. Made once a
        step, after bind()."""
        if self._decode_buckets is None:
            bs = self.block_size
            by_width: dict[int, list[int]] = {}
            for j, i in enumerate(self.decode_seq_index):
                blocks = -(-(self.context_lens[i] + 1) // bs)
                by_width.setdefault(1 << (blocks - 1).bit_length(), []).append(j)
            self._decode_buckets = []
            for width, members in sorted(by_width.items()):
                width = min(width, self.decode_width)
                picked = torch.tensor(members, dtype=torch.long, device=self.device)
                lens = torch.tensor([self.context_lens[self.decode_seq_index[j]] + 1 for j in members])
                mask = None
                if any(n != width * bs for n in lens.tolist()):
                    span = torch.arange(width * bs)
                    mask = (span[None, :] < lens[:, None])[:, None, None, :].to(self.device)
                self._decode_buckets.append(DecodeBucket(self.decode_token_index.index_select(0, picked),
                                                         self.decode_tables.index_select(0, picked)[:, :width],
                                                         mask, len(members) == len(self.decode_seq_index)))
        return self._decode_buckets

    @classmethod
    def decode_view(cls, token_ids: torch.Tensor, positions: torch.Tensor, token_blocks: torch.Tensor,
                    token_offsets: torch.Tensor, tables: torch.Tensor, kv_lens: torch.Tensor,
                    block_size: int) -> "ForwardBatch":
        """A decode-only batch over caller-owned tensors (the static buffers of a CUDA graph).
        Only the tensor fields are read on the GPU decode path."""
        n = token_ids.numel()
        rows = torch.arange(n, dtype=torch.long, device=token_ids.device)
        return cls(
            token_ids=token_ids, positions=positions, query_lens=[1] * n, context_lens=[1] * n, logits_index=None,
            last_logit_row=rows, logit_rows=[slice(i, i + 1) for i in range(n)], decode_seq_index=list(range(n)),
            decode_token_index=rows, prefill_seq_index=[], token_starts=list(range(n)), block_tables=None,
            device=token_ids.device, block_size=block_size, token_blocks=token_blocks, token_offsets=token_offsets,
            tables=tables, decode_tables=tables, decode_kv_lens=kv_lens,
        )

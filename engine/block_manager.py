"""The driver's owner of KV-cache memory: fixed-size blocks, handed to sequences as block tables.

Every rank's cache has the same `num_blocks` blocks of `block_size` positions; a sequence's
keys and values live in the blocks its table lists, in order (position p in block
table[p // block_size], offset p % block_size). Only the driver decides which block holds what;
the ranks follow the tables sent with each step.

Prefix caching: a block whose positions are all computed is named by a hash chained over the
whole prefix (the previous block's hash and this block's tokens), so equal hashes mean equal
prefixes, not just equal blocks. A new sequence reuses the longest run of named blocks its
tokens match (reference counts: several sequences may read one block). A block nobody uses any
more keeps its name and contents until its memory is needed: free blocks with no name are handed
out first, then named ones, least recently freed first (LRU eviction).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field


class NoFreeBlocks(RuntimeError):
    """Raised by allocate/append when the cache has too few free blocks (the caller preempts)."""


def block_hash(previous: bytes | None, tokens: list[int]) -> bytes:
    """The name of a full block: chained over the prefix, so it stands for all tokens up to its end."""
    h = hashlib.blake2b(previous or b"", digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and computed (prefix caching)


@dataclass
class SequenceBlocks:
    table: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # names of the table's leading full blocks


@dataclass
class BlockCounters:
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, tokens found (not computed again)
    evictions: int = 0  # named free blocks handed out for new contents


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs at least one block of at least one position, "
                             f"got num_blocks={num_blocks}, block_size={block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._unnamed: deque[int] = deque(range(num_blocks))  # free, no contents worth keeping
        self._cached: OrderedDict[int, None] = OrderedDict()  # free but named, oldest first
        self._by_hash: dict[bytes, int] = {}
        self._seqs: dict[int, SequenceBlocks] = {}
        self.counters = BlockCounters()

    # -- counts -----------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free named blocks included: they are evicted on demand)."""
        return len(self._unnamed) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached_free(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: int) -> list[int]:
        return self._seqs[seq_id].table

    def has(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    # -- allocation -------------------------------------------------------------------------------

    def _take(self) -> int:
        if self._unnamed:
            block_id = self._unnamed.popleft()
        elif self._cached:
            block_id, _ = self._cached.popitem(last=False)
            block = self.blocks[block_id]
            del self._by_hash[block.hash]
            block.hash = None
            self.counters.evictions += 1
        else:
            raise NoFreeBlocks("no free KV-cache block")
        self.blocks[block_id].ref_count = 1
        return block_id

    def _share(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._cached[block_id]
        block.ref_count += 1

    def _cached_prefix(self, token_ids: list[int]) -> tuple[list[int], list[bytes]]:
        """The named blocks matching the longest prefix of token_ids, at least one token short of
        all of it (the last token must be computed: its logits give the next token)."""
        if not self.enable_prefix_caching:
            return [], []
        found, hashes, previous = [], [], None
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            h = block_hash(previous, token_ids[i * bs:(i + 1) * bs])
            block_id = self._by_hash.get(h)
            if block_id is None:
                break
            found.append(block_id)
            hashes.append(h)
            previous = h
        return found, hashes

    def can_allocate(self, token_ids: list[int]) -> bool:
        found, _ = self._cached_prefix(token_ids)
        shared_free = sum(1 for b in found if self.blocks[b].ref_count == 0)  # reused, so not free for others
        return self.blocks_for(len(token_ids)) - len(found) <= self.num_free - shared_free

    def allocate(self, seq_id: int, token_ids: list[int], use_prefix_cache: bool = True) -> int:
        """Blocks for all of token_ids; returns how many leading tokens are already cached (a
        multiple of block_size). Raises NoFreeBlocks (and takes nothing) when they do not fit."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already has blocks")
        found, hashes = self._cached_prefix(token_ids) if use_prefix_cache else ([], [])
        shared_free = sum(1 for b in found if self.blocks[b].ref_count == 0)
        new = self.blocks_for(len(token_ids)) - len(found)
        if new > self.num_free - shared_free:
            raise NoFreeBlocks(f"sequence {seq_id} needs {new} free blocks, {self.num_free - shared_free} are free")
        for block_id in found:
            self._share(block_id)
        table = found + [self._take() for _ in range(new)]
        self._seqs[seq_id] = SequenceBlocks(table, hashes)
        cached = len(found) * self.block_size
        if use_prefix_cache and self.enable_prefix_caching:
            self.counters.prefix_queries += len(token_ids)
            self.counters.prefix_hits += cached
        return cached

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(self._seqs[seq_id].table) <= self.num_free

    def append(self, seq_id: int, num_tokens: int) -> None:
        """Grow the sequence's table to hold num_tokens positions (NoFreeBlocks: nothing taken)."""
        seq = self._seqs[seq_id]
        more = self.blocks_for(num_tokens) - len(seq.table)
        if more > self.num_free:
            raise NoFreeBlocks(f"sequence {seq_id} needs {more} more blocks, {self.num_free} are free")
        seq.table.extend(self._take() for _ in range(more))

    def mark_computed(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """The first num_computed of token_ids are in the cache: name the blocks that became full."""
        if not self.enable_prefix_caching:
            return
        seq, bs = self._seqs[seq_id], self.block_size
        for i in range(len(seq.hashes), num_computed // bs):
            h = block_hash(seq.hashes[-1] if seq.hashes else None, token_ids[i * bs:(i + 1) * bs])
            seq.hashes.append(h)
            block = self.blocks[seq.table[i]]
            if block.hash is None and h not in self._by_hash:  # an equal block elsewhere keeps the name
                block.hash = h
                self._by_hash[h] = block.block_id

    def free(self, seq_id: int) -> None:
        """Give back a sequence's blocks (unknown ids are ignored). The last blocks go to the
        LRU's newest end first, so a prefix's head outlives its tail."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        for block_id in reversed(seq.table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self._cached[block_id] = None
                else:
                    self._unnamed.append(block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every free block's name (used blocks keep theirs)."""
        for block_id in list(self._cached):
            block = self.blocks[block_id]
            del self._by_hash[block.hash]
            block.hash = None
            self._unnamed.append(block_id)
        self._cached.clear()

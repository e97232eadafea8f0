"""Per-rank key/value cache: one slot per running sequence.

Slot s holds a sequence's keys and values for positions [0, length) as one contiguous run, laid
out [layers, slots, kv_heads, positions, head_dim] so that attention reads a batch of slots as a
strided view. Slots and positions grow on demand (doubling), up to the model's context length.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_len: int):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.max_len = dtype, device, max_len
        self.k = self._alloc(0, 0)
        self.v = self._alloc(0, 0)

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def _alloc(self, slots: int, length: int) -> torch.Tensor:
        return torch.zeros(self.num_layers, slots, self.num_kv_heads, length, self.head_dim,
                           dtype=self.dtype, device=self.device)

    def reserve(self, slots: int, length: int) -> None:
        """Make room for `slots` sequences of up to `length` positions."""
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds the model's context length {self.max_len}")
        if slots <= self.num_slots and length <= self.capacity:
            return
        new_slots = max(slots, min(2 * self.num_slots, slots + 64)) if slots > self.num_slots else self.num_slots
        new_len = min(self.max_len, max(length, 2 * self.capacity, 64)) if length > self.capacity else self.capacity
        for name in ("k", "v"):
            old = getattr(self, name)
            new = self._alloc(new_slots, new_len)
            new[:, : old.shape[1], :, : old.shape[3]] = old
            setattr(self, name, new)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (compaction)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

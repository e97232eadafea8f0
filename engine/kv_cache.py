"""Per-rank paged key/value cache, sized once from a memory budget.

Keys and values of every layer live in fixed-size blocks: k, v [layers, blocks, kv_heads,
block_size, head_dim]. Which block holds which sequence's positions is the driver's business
(engine.block_manager); a rank reads and writes blocks through the block tables sent with each
step, so nothing is ever moved or copied when sequences come and go. One extra block past the
driver's `num_blocks` is scratch: padding rows of a captured CUDA graph write there.

Sizing (`num_kv_blocks`): the driver and every rank compute the block count from the same
config and model shapes, so no rank has to report it: `kv_cache_memory` bytes per rank when set,
else on CPU DEFAULT_CPU_BYTES, clipped to what max_num_seqs sequences of max_model_len need. On
CUDA without `kv_cache_memory`, each rank profiles instead (memory after its weights and one
forward of max_num_batched_tokens, times gpu_memory_utilization), the ranks agree on the minimum
(one all-reduce) and the driver reads it back from the ranks' statistics (`kv_cache_blocks`).
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.engine_config import EngineConfig
from kernels.errors import InputError

DEFAULT_CPU_BYTES = 512 * 2**20
LAZY_ZERO_BYTES = 64 * 2**20  # CPU caches this large are zeroed block by block, as steps first use them


def local_kv_heads(model_config: ModelConfig, world_size: int) -> int:
    """KV heads one rank keeps: split across ranks, or one replicated head each past that."""
    return max(1, model_config.num_key_value_heads // world_size)


def block_bytes(config: EngineConfig, model_config: ModelConfig) -> int:
    """Bytes of one block (keys and values of every layer) on one rank."""
    item = torch.empty(0, dtype=config.dtype).element_size()
    return (2 * model_config.num_hidden_layers * local_kv_heads(model_config, config.tensor_parallel_size)
            * config.block_size * model_config.head_dim * item)


def blocks_needed(config: EngineConfig) -> int:
    """Blocks for max_num_seqs sequences of max_model_len: more is never used."""
    return config.max_num_seqs * -(-config.max_model_len // config.block_size)


def num_kv_blocks(config: EngineConfig, model_config: ModelConfig) -> int | None:
    """The cache's block count from the config alone, or None when the ranks must profile (CUDA
    without kv_cache_memory)."""
    if config.kv_cache_memory is None and config.device == "cuda":
        return None
    budget = config.kv_cache_memory if config.kv_cache_memory is not None else DEFAULT_CPU_BYTES
    blocks = min(budget // block_bytes(config, model_config), blocks_needed(config))
    if blocks < 1:
        raise InputError(f"kv_cache_memory={budget} bytes holds no KV block "
                         f"({block_bytes(config, model_config)} bytes each on a rank)")
    return int(blocks)


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, num_blocks: int, block_size: int = 16):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.block_size = dtype, device, block_size
        self.num_blocks = num_blocks  # the driver's blocks; block num_blocks is scratch
        self._slot_blocks = 0  # see reserve()
        self._allocate(num_blocks + 1)

    def _allocate(self, blocks: int, lazy_zero: bool = True) -> None:
        """Attention masks positions past a sequence's length, but a NaN there would still poison the
        sum (0 x NaN): every block must hold finite values before it is first read. A large CPU cache
        is left unwritten (a zero fill would make the whole budget resident at start-up) and each block
        is zeroed when a step first names it (`zero_new_blocks`); otherwise the cache starts zeroed."""
        shape = (self.num_layers, blocks, self.num_kv_heads, self.block_size, self.head_dim)
        nbytes = 2 * torch.Size(shape).numel() * torch.empty(0, dtype=self.dtype).element_size()
        if lazy_zero and self.device.type == "cpu" and nbytes >= LAZY_ZERO_BYTES:
            self.k, self.v = torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype)
            self._unzeroed = torch.ones(blocks, dtype=torch.bool)
            self._unzeroed_count = blocks
        else:
            self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self._unzeroed, self._unzeroed_count = None, 0

    def zero_new_blocks(self, block_tables: list[list[int]] | None) -> None:
        """Zero the blocks of these tables that no step has named before (lazily zeroed caches only)."""
        if not self._unzeroed_count or not block_tables:
            return
        ids = torch.tensor([b for table in block_tables for b in table], dtype=torch.long)
        if ids.numel() == 0:
            return
        new = ids[self._unzeroed[ids]].unique()
        if new.numel():
            self.k[:, new] = 0
            self.v[:, new] = 0
            self._unzeroed[new] = False
            self._unzeroed_count -= int(new.numel())

    @property
    def scratch_block(self) -> int:
        return self.num_blocks

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    # -- fixed tables for callers that drive the model directly (tests, calibration) -------------

    def reserve(self, slots: int, length: int) -> None:
        """Give sequence "slot" s the blocks [s * m, (s + 1) * m), m covering `length` positions: a
        batch built with slot numbers instead of block tables then reads those (growing the cache
        if it is too small; only for callers that drive the model directly, never after capture)."""
        m = -(-length // self.block_size)
        if slots * m > self.num_blocks:
            self.num_blocks = slots * m
            self._allocate(self.num_blocks + 1, lazy_zero=False)  # these callers send no block tables
        self._slot_blocks = max(self._slot_blocks, m)
        # a budget-sized cache is lazily zeroed: these blocks are read without a step naming them
        self.zero_new_blocks(self.slot_tables(list(range(slots))))

    def slot_tables(self, slots: list[int]) -> list[list[int]]:
        m = self._slot_blocks
        if m == 0:
            raise ValueError("a batch built from slot numbers needs KVCache.reserve(slots, length) first")
        return [list(range(s * m, (s + 1) * m)) for s in slots]

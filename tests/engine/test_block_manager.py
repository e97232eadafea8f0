"""The driver's block manager: allocation, reference counts, prefix hashes and LRU eviction, by counts."""

import pytest

from engine.block_manager import BlockManager, NoFreeBlocks, block_hash


def test_allocate_append_free_counts():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    assert bm.allocate(0, list(range(10))) == 0  # 10 tokens: 3 blocks
    assert len(bm.table(0)) == 3 and bm.num_used == 3 and bm.num_free == 5
    bm.append(0, 12)  # still 3 blocks
    assert bm.num_used == 3
    bm.append(0, 13)  # a fourth
    assert len(bm.table(0)) == 4 and bm.num_used == 4
    assert bm.allocate(1, list(range(16))) == 0
    assert bm.num_used == 8 and bm.num_free == 0
    assert len(set(bm.table(0)) | set(bm.table(1))) == 8  # no block handed out twice
    assert not bm.can_append(1, 17)
    with pytest.raises(NoFreeBlocks):
        bm.append(1, 17)
    assert len(bm.table(1)) == 4  # a failed append takes nothing
    with pytest.raises(NoFreeBlocks):
        bm.allocate(2, [1])
    assert not bm.has(2)
    bm.free(0)
    assert bm.num_used == 4 and bm.num_free == 4
    bm.free(1)
    bm.free(1)  # unknown ids are ignored
    assert bm.num_used == 0 and bm.num_free == 8
    assert bm.counters.prefix_queries == 0  # prefix caching off: nothing looked up


def test_prefix_hash_is_chained_over_the_prefix():
    a = block_hash(None, [1, 2, 3, 4])
    assert a == block_hash(None, [1, 2, 3, 4])
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(block_hash(None, [9, 9, 9, 9]), [5, 6, 7, 8])
    assert block_hash(None, [1, 2, 3, 4]) != block_hash(None, [1, 2, 3, 5])


def test_prefix_cache_shares_full_blocks_with_reference_counts():
    bm = BlockManager(num_blocks=10, block_size=4)
    system = list(range(100, 112))  # 3 full blocks
    first = system + [1, 2]
    assert bm.allocate(0, first) == 0
    bm.mark_computed(0, first, len(first))  # 3 full blocks named, the 4th (2 tokens) not
    assert bm.counters.prefix_queries == 14 and bm.counters.prefix_hits == 0
    second = system + [7, 8, 9]
    assert bm.allocate(1, second) == 12  # the three system blocks are reused
    assert bm.table(1)[:3] == bm.table(0)[:3] and bm.table(1)[3] != bm.table(0)[3]
    assert [bm.blocks[b].ref_count for b in bm.table(0)[:3]] == [2, 2, 2]
    assert bm.num_used == 5  # 3 shared + one tail each
    assert bm.counters.prefix_queries == 29 and bm.counters.prefix_hits == 12
    bm.free(0)
    assert [bm.blocks[b].ref_count for b in bm.table(1)[:3]] == [1, 1, 1]
    assert bm.num_used == 4
    bm.free(1)
    assert bm.num_used == 0 and bm.num_cached_free == 3  # free, but still named
    # a prompt that is exactly the cached blocks recomputes its last block (its last token's logits are needed)
    assert bm.allocate(2, system) == 8
    bm.free(2)
    # a different first block breaks the chain even if later blocks are equal
    other = [0, 0, 0, 0] + system[4:] + [1]
    assert bm.allocate(3, other) == 0
    bm.free(3)


def test_lru_eviction_of_cached_free_blocks():
    bm = BlockManager(num_blocks=4, block_size=2)
    old, new = [1, 2, 3, 4, 9], [5, 6, 7, 8, 9]
    bm.allocate(0, old)
    bm.mark_computed(0, old, 5)
    bm.free(0)  # old's 2 named blocks are cached-free; its tail block is plainly free
    bm.allocate(1, new)  # 3 blocks: 2 unnamed first (none left after), then the oldest cached one
    assert bm.counters.evictions == 1
    bm.mark_computed(1, new, 5)
    bm.free(1)
    assert bm.num_used == 0
    # the evicted block was old's tail-most full block (freed first, so least recent): old's head remains
    assert bm.allocate(2, old) == 2
    # its second block took the last unnamed block and evicted the oldest named one: new's second block
    assert bm.counters.evictions == 2
    bm.free(2)
    assert bm.allocate(3, new) == 2
    assert bm.counters.prefix_hits == 4 and bm.counters.prefix_queries == 20
    bm.free(3)
    bm.reset_prefix_cache()
    assert bm.num_cached_free == 0 and bm.num_free == 4
    assert bm.allocate(4, new) == 0

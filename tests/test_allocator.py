"""The caching allocator model against the rules of PyTorch's CUDACachingAllocator."""

from __future__ import annotations

import random

import pytest

from autotune.allocator import MIB, CachingAllocator, rounded_bytes, segment_bytes


def test_requests_round_to_512_bytes_and_pick_their_segment_size():
    assert rounded_bytes(1) == 512
    assert rounded_bytes(513) == 1024
    assert segment_bytes(rounded_bytes(100)) == 2 * MIB  # small pool
    assert segment_bytes(rounded_bytes(1 * MIB + 1)) == 20 * MIB  # large, under 10 MiB
    assert segment_bytes(rounded_bytes(15 * MIB + 3)) == 16 * MIB  # rounded up to 2 MiB


def test_small_requests_share_one_small_segment_and_large_ones_reserve_their_own():
    allocator = CachingAllocator()
    for _ in range(4):
        allocator.malloc(100 * 1024)
    assert allocator.reserved_bytes == 2 * MIB
    allocator.malloc(3 * MIB)
    allocator.malloc(3 * MIB)  # the rest of the first 20 MiB segment serves it
    assert allocator.reserved_bytes == 2 * MIB + 20 * MIB
    allocator.malloc(30 * MIB)
    assert allocator.reserved_bytes == 2 * MIB + 20 * MIB + 30 * MIB
    assert allocator.allocated_bytes == 4 * 100 * 1024 + 6 * MIB + 30 * MIB


def test_freed_blocks_are_reused_best_fit_and_merge_with_free_neighbours():
    allocator = CachingAllocator()
    a = allocator.malloc(40 * MIB)
    b = allocator.malloc(60 * MIB)
    allocator.free(a)
    allocator.free(b)
    # 30 MiB fits both cached segments; the smaller (40 MiB) is taken and split
    c = allocator.malloc(30 * MIB)
    assert c.segment == a.segment and allocator.reserved_bytes == 100 * MIB
    allocator.malloc(60 * MIB)  # the 60 MiB segment, whole
    assert allocator.reserved_bytes == 100 * MIB
    allocator.free(c)
    # the 30 MiB block merged back with the 10 MiB rest: 40 MiB free again, no new segment
    allocator.malloc(40 * MIB)
    assert allocator.reserved_bytes == 100 * MIB


def _two_equal_free_blocks_then_a_whole_segment(addresses: tuple[int, int] | None) -> int:
    """A 20 MiB segment with 12 MiB of it free and a later 12 MiB segment, all free: a 12 MiB
    request takes one of the equal blocks, then the 20 MiB segment's head is freed and 20 MiB
    asked for. Returns the bytes reserved at the end."""
    first, second = addresses or (None, None)
    allocator = CachingAllocator()
    head = allocator.malloc(8 * MIB, address=first)  # a 20 MiB segment
    tail = allocator.malloc(12 * MIB)  # its 12 MiB rest
    later = allocator.malloc(12 * MIB, address=second)  # a 12 MiB segment of its own
    allocator.free(tail)
    allocator.free(later)
    taken = allocator.malloc(12 * MIB)
    expected = later if addresses and addresses[1] < addresses[0] else tail
    assert taken.segment == expected.segment
    allocator.free(head)
    allocator.malloc(20 * MIB)
    return allocator.reserved_bytes


def test_equal_free_blocks_go_to_the_lowest_address():
    # the later segment below the first: it serves the 12 MiB request, so the first segment is
    # whole again when its head is freed and holds the 20 MiB request
    assert _two_equal_free_blocks_then_a_whole_segment((2**40, 2**39)) == 32 * MIB
    # above it: the first segment's rest is taken, the 20 MiB request reserves a new segment
    assert _two_equal_free_blocks_then_a_whole_segment((2**39, 2**40)) == 52 * MIB
    # addresses unknown: a segment reserved earlier counts as lower
    assert _two_equal_free_blocks_then_a_whole_segment(None) == 52 * MIB


def test_two_segments_at_one_address_keep_their_free_blocks_apart():
    # a trace's driver reuses a given-back segment's address while the model still holds its
    # own there: the two segments' equal free blocks shared a key, and freeing one took the
    # other's off the free list, so a later request got a block inside a free one
    allocator = CachingAllocator()
    first = allocator.malloc(8 * MIB, address=5 * MIB)  # a 20 MiB segment
    rest = allocator.malloc(12 * MIB)  # its rest
    second = allocator.malloc(8 * MIB, address=5 * MIB)  # a second one at the same address
    allocator.free(rest)  # the first segment's rest is free: 12 MiB at offset 8 MiB
    allocator.free(second)  # the second segment is whole again
    taken = allocator.malloc(12 * MIB)
    assert (taken.segment, taken.offset) == (first.segment, 8 * MIB)
    whole = allocator.malloc(20 * MIB)
    assert (whole.segment, whole.offset) == (second.segment, 0)
    assert allocator.reserved_bytes == 40 * MIB


def test_fragmentation_reserves_a_new_segment_though_enough_bytes_are_free():
    allocator = CachingAllocator()
    blocks = [allocator.malloc(20 * MIB) for _ in range(3)]
    for block in blocks:
        allocator.free(block)
    allocator.malloc(30 * MIB)  # no 20 MiB segment holds it: 60 MiB free, 30 more reserved
    assert allocator.reserved_bytes == 90 * MIB
    assert allocator.peak_allocated_bytes == 60 * MIB


def test_a_remainder_of_one_mib_or_less_is_not_split_off_a_large_block():
    allocator = CachingAllocator()
    first = allocator.malloc(12 * MIB)
    allocator.free(first)
    block = allocator.malloc(11 * MIB + 512 * 1024)
    assert block.size == 12 * MIB  # the 0.5 MiB rest stays with the block
    assert allocator.allocated_bytes == 12 * MIB


def test_empty_cache_returns_only_segments_with_nothing_allocated():
    allocator = CachingAllocator()
    kept = allocator.malloc(40 * MIB)
    freed = allocator.malloc(50 * MIB)
    allocator.free(freed)
    allocator.empty_cache()
    assert allocator.reserved_bytes == 40 * MIB
    assert allocator.peak_reserved_bytes == 90 * MIB
    allocator.free(kept)
    allocator.empty_cache()
    assert allocator.reserved_bytes == 0


def test_expandable_segments_grow_the_free_tail_instead_of_reserving_a_segment():
    plain, expandable = CachingAllocator(), CachingAllocator(expandable_segments=True)
    for allocator in (plain, expandable):
        blocks = [allocator.malloc(20 * MIB) for _ in range(3)]
        allocator.free(blocks[2])
        allocator.malloc(30 * MIB)
    assert plain.reserved_bytes == 90 * MIB
    # the last 20 MiB block is free at the end: mapping 20 MiB more (a page) serves 30 MiB
    assert expandable.reserved_bytes == 80 * MIB
    assert expandable.allocated_bytes == plain.allocated_bytes == 70 * MIB


def _segment_chains(allocator: CachingAllocator, live: list) -> list[list]:
    """Every segment's blocks in address order, from any block the allocator or a caller
    holds."""
    heads = {}
    known = [entry[4] for pool in allocator._free.values() for entry in pool]
    known += live
    for block in known:
        while block.prev is not None:
            block = block.prev
        heads[id(block)] = block
    chains = []
    for head in heads.values():
        chain, block = [], head
        while block is not None:
            chain.append(block)
            block = block.next
        chains.append(chain)
    return chains


@pytest.mark.parametrize("expandable", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_random_requests_keep_every_segment_a_row_of_blocks_that_add_up(expandable, seed):
    # the blocks of a segment follow each other without gap or overlap, and reserved and
    # allocated bytes are the sums of the mapped and the allocated ones, whatever the order of
    # requests, frees and empty_cache() calls
    rng = random.Random(seed)
    allocator = CachingAllocator(expandable_segments=expandable)
    live: list = []
    for step in range(1500):
        roll = rng.random()
        if roll < 0.02:
            allocator.empty_cache()
        elif roll < 0.5 and live:
            allocator.free(live.pop(rng.randrange(len(live))))
        else:
            low, high = rng.choice([(1, MIB), (MIB, 12 * MIB), (12 * MIB, 90 * MIB)])
            size = rng.randrange(low, high)
            live.append(allocator.malloc(size))
        if step % 50:
            continue
        chains = _segment_chains(allocator, live)
        for chain in chains:
            for before, after in zip(chain, chain[1:]):
                assert before.offset + before.size == after.offset
                assert before.segment == after.segment and after.prev is before
        blocks = [block for chain in chains for block in chain]
        assert allocator.allocated_bytes == sum(b.size for b in live)
        assert all(not b.free for b in live)
        mapped = sum(b.size for b in blocks if b.mapped)
        assert allocator.reserved_bytes == mapped


def test_expandable_segments_split_off_any_rest_of_512_bytes_or_more():
    for expandable, kept in ((False, 12 * MIB), (True, 11 * MIB + 512 * 1024)):
        allocator = CachingAllocator(expandable_segments=expandable)
        first = allocator.malloc(12 * MIB)
        allocator.malloc(8 * MIB)  # expandable: the rest of the first 20 MiB page
        allocator.free(first)
        block = allocator.malloc(11 * MIB + 512 * 1024)
        assert block.offset == first.offset
        assert block.size == kept and allocator.allocated_bytes == kept + 8 * MIB


def test_expandable_best_fit_spares_the_free_block_the_segment_grows_from():
    allocator = CachingAllocator(expandable_segments=True)
    first = allocator.malloc(30 * MIB)  # two 20 MiB pages; their last 10 MiB free
    allocator.malloc(10 * MIB)  # takes those 10 MiB
    allocator.malloc(25 * MIB)  # two more pages; their last 15 MiB free, unmapped space after
    allocator.free(first)
    # 12 MiB fits the 15 MiB block best, but it can grow: the 30 MiB block is taken instead
    taken = allocator.malloc(12 * MIB)
    assert taken.offset == first.offset == 0
    assert allocator.reserved_bytes == 80 * MIB


def test_expandable_empty_cache_unmaps_whole_free_pages_anywhere_and_maps_them_again_first():
    allocator = CachingAllocator(expandable_segments=True)
    head = allocator.malloc(50 * MIB)  # three 20 MiB pages
    allocator.malloc(10 * MIB)  # the third page's free 10 MiB
    allocator.free(head)
    allocator.empty_cache()
    # the two whole pages inside the free 50 MiB go; its last 10 MiB share a page still used
    assert allocator.reserved_bytes == 20 * MIB
    # 30 MiB: the unmapped 40 MiB at the start and the free 10 MiB after them hold it
    block = allocator.malloc(30 * MIB)
    assert block.offset == 0
    assert allocator.reserved_bytes == allocator.peak_reserved_bytes == 60 * MIB

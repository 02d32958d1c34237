"""A model of PyTorch's CUDA caching allocator: what `torch.cuda.max_memory_reserved()` becomes
for a given sequence of allocations and frees.

Reserved memory is allocated memory plus what the allocator keeps cached and cannot hand out:
blocks freed into segments whose free space is split in the wrong sizes. That depends on the
order and sizes of every allocation, which no per-tensor formula sees; replaying the sequence
through the allocator's own rules does (`autotune.replay` records the sequence of a training
step). The rules are those of c10/cuda/CUDACachingAllocator.cpp with default settings:

- a request is rounded up to a multiple of 512 bytes;
- requests up to 1 MiB come from the small pool, whose segments are 2 MiB; larger ones from the
  large pool, whose segments are 20 MiB for requests under 10 MiB and the request rounded up to
  2 MiB otherwise;
- a request takes the smallest cached free block that holds it (best fit), of equal ones the
  lowest address; the rest of the block is split off when it is at least 512 bytes (small
  pool) or more than 1 MiB (large pool);
- a freed block merges with free neighbours of its segment; segments go back to the device only
  on `empty_cache()`.

Addresses come from the driver and a replay does not see them: a segment's place in the order
of equal blocks is when it was reserved, unless `malloc` is told the new segment's address (as a
recorded trace does). On the H200 snapshots the driver put most later segments below earlier
ones, so the two orders part ways; docs/memory-model.md says what that changes.

With `expandable_segments:True` each pool is one segment of address space in which pages (2 MiB
for the small pool, 20 MiB for the large one) are mapped as needed, and the rules change:

- any rest of at least 512 bytes is split off, in the large pool too;
- best fit counts a free block followed by unmapped space as that much larger, so a request
  takes another free block that holds it before the block the segment could grow from;
- a request no free block holds maps pages at the lowest unmapped place that, with the free
  block before it, holds the request (the end of the segment unless `empty_cache()` unmapped
  pages inside it);
- `empty_cache()` unmaps every whole page inside a free block, wherever it is.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

MIB = 2**20
MIN_BLOCK_BYTES = 512
SMALL_REQUEST_BYTES = 1 * MIB
SMALL_SEGMENT_BYTES = 2 * MIB
LARGE_SEGMENT_BYTES = 20 * MIB
MIN_LARGE_ALLOC_BYTES = 10 * MIB
LARGE_ROUND_BYTES = 2 * MIB
ADDRESS_SPACE_BYTES = 2**50
"""An expandable segment's address space, unbounded here. CUDA's spans 9/8 of the device's memory
and, where unmapped holes (`empty_cache()`'s) push a request past its end, opens a second
segment for it; the model, which does not know the device, grows the one segment instead."""


def rounded_bytes(nbytes: int) -> int:
    """A request's size as the allocator serves it."""
    if nbytes < MIN_BLOCK_BYTES:
        return MIN_BLOCK_BYTES
    return -(-nbytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES


def segment_bytes(size: int) -> int:
    """Bytes of the new segment a rounded request of `size` reserves when nothing cached fits."""
    if size <= SMALL_REQUEST_BYTES:
        return SMALL_SEGMENT_BYTES
    if size < MIN_LARGE_ALLOC_BYTES:
        return LARGE_SEGMENT_BYTES
    return -(-size // LARGE_ROUND_BYTES) * LARGE_ROUND_BYTES


@dataclass(eq=False)
class Block:
    segment: int
    offset: int
    size: int
    small: bool
    free: bool = False
    mapped: bool = True
    """False for an expandable segment's address space with no pages behind it."""
    prev: Block | None = None
    next: Block | None = None
    address: int = 0
    """Where the block's segment starts, or its order of reservation where that is unknown."""

    def splice(self, before: Block | None, after: Block | None) -> None:
        """Put this block between two neighbours of its segment."""
        self.prev, self.next = before, after
        if before is not None:
            before.next = self
        if after is not None:
            after.prev = self

    def key(self) -> tuple[int, int, int, int]:
        # the segment too: two segments may be given one address (a trace's driver reuses the
        # address of a segment it gave back while the model still holds its own there), and
        # a key two free blocks share had the wrong one taken off the free list
        return (self.size, self.address, self.segment, self.offset)


class CachingAllocator:
    """Allocates and frees blocks as the CUDA caching allocator does; tracks reserved and
    allocated bytes and their peaks."""

    def __init__(self, expandable_segments: bool = False) -> None:
        self.expandable_segments = expandable_segments
        self.reserved_bytes = 0
        self.allocated_bytes = 0
        self.peak_reserved_bytes = 0
        self.peak_allocated_bytes = 0
        self._free: dict[bool, list[tuple[int, int, int, int, Block]]] = {True: [], False: []}
        self._segments: dict[int, int] = {}  # segment id -> reserved bytes
        self._unmapped: dict[bool, list[Block]] = {True: [], False: []}  # by offset
        self._next_segment = 0
        self.reservations: list[tuple[int, int]] = []
        """(bytes reserved, bytes requested) of every new segment or mapping, in order."""

    # -- free lists: (size, address, segment, offset, block), sorted: the first fit is the best
    def _insert_free(self, block: Block) -> None:
        block.free = True
        pool = self._free[block.small]
        index = bisect.bisect_left(pool, block.key(), key=lambda e: e[:4])
        pool.insert(index, (*block.key(), block))

    def _remove_free(self, block: Block) -> None:
        pool = self._free[block.small]
        index = bisect.bisect_left(pool, block.key(), key=lambda e: e[:4])
        del pool[index]
        block.free = False

    def _best_fit(self, size: int, small: bool) -> Block | None:
        pool = self._free[small]
        index = bisect.bisect_left(pool, size, key=lambda e: e[0])
        if index == len(pool):
            return None
        if self.expandable_segments:
            # a block the segment can grow from counts as that much larger: the next larger
            # block is taken instead while it is smaller still
            growable = _growable_bytes
            while index + 1 < len(pool) and growable(pool[index + 1][4]) < growable(pool[index][4]):
                index += 1
        block = pool[index][4]
        self._remove_free(block)
        return block

    def _reserve(self, nbytes: int, segment: int, requested: int) -> None:
        self.reservations.append((nbytes, requested))
        self._segments[segment] = self._segments.get(segment, 0) + nbytes
        self.reserved_bytes += nbytes
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)

    def _new_segment(self, size: int, small: bool, address: int | None) -> Block:
        self._next_segment += 1
        nbytes = segment_bytes(size)
        self._reserve(nbytes, self._next_segment, size)
        where = self._next_segment if address is None else address
        return Block(self._next_segment, 0, nbytes, small, address=where)

    # -- expandable segments
    def _merge(self, block: Block, neighbour: Block | None) -> None:
        """Absorb a neighbour that is free and mapped as `block` is, or unmapped as it is."""
        if neighbour is None or neighbour.mapped != block.mapped:
            return
        if neighbour.mapped and not neighbour.free:
            return
        if neighbour.mapped:
            self._remove_free(neighbour)
        else:
            self._unmapped[neighbour.small].remove(neighbour)
        if neighbour is block.prev:
            block.offset = neighbour.offset
            block.prev = neighbour.prev
            if block.prev is not None:
                block.prev.next = block
        else:
            block.next = neighbour.next
            if block.next is not None:
                block.next.prev = block
        block.size += neighbour.size

    def _insert_unmapped(self, block: Block) -> None:
        block.mapped, block.free = False, False
        bisect.insort(self._unmapped[block.small], block, key=lambda b: b.offset)

    def _map(self, block: Block, size: int, requested: int) -> None:
        """Map the pages that hold the first `size` bytes of an unmapped block; it joins the
        free block before it."""
        page = _page_bytes(block.small)
        mapped = min(-(-size // page) * page, block.size)
        self._unmapped[block.small].remove(block)
        block.mapped = True
        if mapped < block.size:
            rest = Block(
                block.segment,
                block.offset + mapped,
                block.size - mapped,
                block.small,
                address=block.address,
            )
            rest.splice(block, block.next)
            block.size = mapped
            self._insert_unmapped(rest)
        self._merge(block, block.prev)
        self._merge(block, block.next)
        self._reserve(mapped, block.segment, requested)
        self._insert_free(block)

    def _grow_expandable(self, size: int, small: bool) -> Block:
        """Map pages where a request no free block holds fits: the lowest unmapped place that,
        with the free block before it, holds `size`."""
        unmapped = self._unmapped[small]
        if not unmapped:  # the pool's first request: its segment's address space
            self._next_segment += 1
            space = Block(self._next_segment, 0, ADDRESS_SPACE_BYTES, small)
            space.address = self._next_segment
            self._insert_unmapped(space)
        starts = map(_with_free_before, unmapped)
        candidate = next(c for c in starts if _free_bytes_from(c, size) >= size)
        if not candidate.mapped:
            self._map(candidate, min(candidate.size, size), size)
        while candidate.size < size:
            grown = candidate.next
            assert grown is not None and not grown.mapped
            self._map(grown, min(size - candidate.size, grown.size), size)
            candidate = grown
        self._remove_free(candidate)
        return candidate

    def _unmap(self, block: Block) -> None:
        """Unmap the whole pages inside a free block of an expandable segment."""
        page = _page_bytes(block.small)
        begin = -(-block.offset // page) * page
        end = (block.offset + block.size) // page * page
        if begin >= end:
            return
        self._remove_free(block)
        parts = ((block.offset, begin, True), (end, block.offset + block.size, False))
        for start, stop, before in parts:
            if stop > start:
                part = Block(block.segment, start, stop - start, block.small, address=block.address)
                part.splice(*((block.prev, block) if before else (block, block.next)))
                self._insert_free(part)
        block.offset, block.size = begin, end - begin
        self._segments[block.segment] -= block.size
        self.reserved_bytes -= block.size
        block.mapped = False
        self._merge(block, block.prev)
        self._merge(block, block.next)
        self._insert_unmapped(block)

    def malloc(self, nbytes: int, address: int | None = None) -> Block:
        """Serve a request of `nbytes`; `address`: where the segment it reserves, if it must,
        starts (a recorded trace's), which orders it among equal free blocks."""
        size = rounded_bytes(nbytes)
        small = size <= SMALL_REQUEST_BYTES
        block = self._best_fit(size, small)
        if block is None:
            if self.expandable_segments:
                block = self._grow_expandable(size, small)
            else:
                block = self._new_segment(size, small, address)
        remaining = block.size - size
        if small or self.expandable_segments:
            split = remaining >= MIN_BLOCK_BYTES
        else:
            split = remaining > SMALL_REQUEST_BYTES
        if split:
            rest = Block(
                block.segment, block.offset + size, remaining, small, address=block.address
            )
            rest.splice(block, block.next)
            block.size = size
            self._insert_free(rest)
        self.allocated_bytes += block.size
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)
        return block

    def free(self, block: Block) -> None:
        self.allocated_bytes -= block.size
        self._merge(block, block.prev)
        self._merge(block, block.next)
        self._insert_free(block)

    def empty_cache(self) -> None:
        """Give back every segment that holds no allocated block (`torch.cuda.empty_cache()`);
        with expandable segments, unmap every whole page inside a free block."""
        for pool in self._free.values():
            for *_, block in list(pool):
                if self.expandable_segments:
                    self._unmap(block)
                elif block.prev is None and block.next is None:
                    self._remove_free(block)
                    self.reserved_bytes -= self._segments.pop(block.segment)


def _page_bytes(small: bool) -> int:
    """What an expandable segment of a pool maps at a time."""
    return SMALL_SEGMENT_BYTES if small else LARGE_SEGMENT_BYTES


def _with_free_before(unmapped: Block) -> Block:
    """Where a mapping at an unmapped block starts: the free block before it, if there is one."""
    before = unmapped.prev
    return before if before is not None and before.free else unmapped


def _growable_bytes(block: Block) -> int:
    """A free block's size as best fit counts it: with the unmapped space after it, if any."""
    after = block.next
    return block.size + (after.size if after is not None and not after.mapped else 0)


def _free_bytes_from(block: Block, size: int) -> int:
    """The bytes from `block` on that are free or unmapped, counted until `size` is reached."""
    total, walk = 0, block
    while total < size and (walk.free or not walk.mapped):
        total += walk.size
        if walk.next is None:
            break
        walk = walk.next
    return total

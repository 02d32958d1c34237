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

With `expandable_segments:True` each pool is one segment that grows by mapping pages (2 MiB for
the small pool, 20 MiB for the large one) at its end, so a request that fits nowhere extends the
free tail instead of reserving a new segment.
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
    prev: Block | None = None
    next: Block | None = None
    address: int = 0
    """Where the block's segment starts, or its order of reservation where that is unknown."""

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
        self._tails: dict[bool, Block] = {}  # expandable: each pool's last block
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

    def _grow_expandable(self, size: int, small: bool) -> Block:
        """Map pages at the end of the pool's one segment until its free tail holds `size`."""
        page = SMALL_SEGMENT_BYTES if small else LARGE_SEGMENT_BYTES
        tail = self._tails.get(small)
        if tail is None:
            self._next_segment += 1
            segment, offset, have = self._next_segment, 0, 0
        elif tail.free:
            self._remove_free(tail)
            segment, offset, have = tail.segment, tail.offset, tail.size
        else:
            segment, offset, have = tail.segment, tail.offset + tail.size, 0
        mapped = -(-(size - have) // page) * page
        self._reserve(mapped, segment, size)
        block = Block(segment, offset, have + mapped, small, address=segment)
        if tail is not None and tail.free:
            block.prev = tail.prev
        elif tail is not None:
            block.prev = tail
        if block.prev is not None:
            block.prev.next = block
        self._tails[small] = block
        return block

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
        if remaining >= MIN_BLOCK_BYTES if small else remaining > SMALL_REQUEST_BYTES:
            rest = Block(
                block.segment, block.offset + size, remaining, small, address=block.address
            )
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            if self._tails.get(small) is block:
                self._tails[small] = rest
            self._insert_free(rest)
        self.allocated_bytes += block.size
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)
        return block

    def free(self, block: Block) -> None:
        self.allocated_bytes -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is None or not neighbour.free:
                continue
            self._remove_free(neighbour)
            if neighbour is block.prev:
                block.offset = neighbour.offset
                block.prev = neighbour.prev
                if block.prev is not None:
                    block.prev.next = block
            else:
                block.next = neighbour.next
                if block.next is not None:
                    block.next.prev = block
                if self._tails.get(block.small) is neighbour:
                    self._tails[block.small] = block
            block.size += neighbour.size
        self._insert_free(block)

    def empty_cache(self) -> None:
        """Give back every segment that holds no allocated block (`torch.cuda.empty_cache()`);
        with expandable segments, unmap the free pages at each pool's end."""
        for small, pool in self._free.items():
            for *_, block in list(pool):
                whole = block.prev is None and block.next is None
                if self.expandable_segments and block is self._tails.get(small):
                    page = SMALL_SEGMENT_BYTES if small else LARGE_SEGMENT_BYTES
                    unmapped = block.size // page * page
                    if unmapped == 0:
                        continue
                    self._remove_free(block)
                    self._segments[block.segment] -= unmapped
                    self.reserved_bytes -= unmapped
                    block.size -= unmapped
                    if block.size:
                        self._insert_free(block)
                    else:
                        self._tails[small] = block.prev  # type: ignore[assignment]
                        if block.prev is not None:
                            block.prev.next = None
                elif whole and not self.expandable_segments:
                    self._remove_free(block)
                    self.reserved_bytes -= self._segments.pop(block.segment)

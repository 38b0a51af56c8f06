"""Packing: a source's examples laid end to end in rows of `max_length` tokens, as flat arrays.

`--data.packing true` packs each source once, when it is prepared, by best-fit decreasing (longest
example first, into the fullest row it still fits). The rows are a pure function of the example lengths,
so the train order over them stays a pure function of (seed, rows consumed): exact resume holds as
without packing. A row is `items[offsets[r]:offsets[r + 1]]`, the indices of its examples in packing
order; nothing per example lives in a Python list.
"""

from __future__ import annotations

import numpy as np

_CHUNK = 1 << 16


def best_fit_decreasing(lengths, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of example indices, each holding at most `capacity` tokens, as (offsets, items) arrays.

    Examples of exactly `capacity` tokens (the full pieces of long documents) fill a row each, as
    best-fit would place them; the rest go longest first into the row with the least room that still
    fits, else a new row. A segment tree over the room left (0..capacity) finds that row in
    O(log capacity). Deterministic: the same lengths always give the same rows."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n and int(lengths.max()) > capacity:
        i = int(np.argmax(lengths))
        raise ValueError(f"example {i} has {lengths[i]} tokens, more than the row capacity {capacity}")
    order = np.lexsort((np.arange(n), -lengths))  # longest first, ties by index
    full = int(np.count_nonzero(lengths == capacity))
    row_of = np.empty(n, dtype=np.int64)
    row_of[order[:full]] = np.arange(full)
    rows = full

    size = 1 << max(capacity, 1).bit_length()  # leaves 0..size-1 cover every room 0..capacity
    count = [0] * (2 * size)  # count[node]: open rows whose room falls in the node's range
    by_room: list[list[int]] = [[] for _ in range(size)]  # room -> open rows with exactly that room

    def add(room: int, delta: int) -> None:
        node = room + size
        while node:
            count[node] += delta
            node //= 2

    def tightest(need: int) -> int | None:
        """The smallest room >= need that an open row has (leftmost non-empty leaf at or after need)."""
        stack = [(1, 0, size - 1)]
        while stack:
            node, lo, hi = stack.pop()
            if hi < need or not count[node]:
                continue
            if lo == hi:
                return lo
            mid = (lo + hi) // 2
            stack += [(2 * node + 1, mid + 1, hi), (2 * node, lo, mid)]  # left child popped first
        return None

    rest = order[full:]
    for first in range(0, len(rest), _CHUNK):  # Python ints for one chunk at a time, never for all
        chunk = rest[first : first + _CHUNK]
        placed = np.empty(len(chunk), dtype=np.int64)
        for j, need in enumerate(lengths[chunk].tolist()):
            room = tightest(need)
            if room is None:
                row, room = rows, capacity
                rows += 1
            else:
                row = by_room[room].pop()
                add(room, -1)
            placed[j] = row
            if room - need > 0:
                by_room[room - need].append(row)
                add(room - need, 1)
        row_of[chunk] = placed
    items = order[np.argsort(row_of[order], kind="stable")]  # grouped by row, in placement order
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=rows), out=offsets[1:])
    return offsets, items


def rows_of(offsets: np.ndarray, items: np.ndarray) -> list[list[int]]:
    """The rows as lists (for tests and small inspections only)."""
    return [items[offsets[r] : offsets[r + 1]].tolist() for r in range(len(offsets) - 1)]

"""Order: the blend's draws -> train rows, and this rank's micro-batches.

Source i's k-th draw is row perm_i,e[k mod n_i] of that source, with e = k // n_i and one seeded
permutation per epoch of the source: without replacement within an epoch, reshuffled for the next, so a
small source is oversampled epoch after epoch and a large one undersampled. The train order is thus a
pure function of (seed, shares, position); the data position is one integer (`samples_seen`) that
survives a restart and a change of world size, and nothing already consumed is re-read on resume.
Everything is a numpy array: a window of positions is a handful of vector operations.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch

from dtrain.data.blend import Blend


def _epoch_seed(seed: int, source: int, epoch: int) -> int:
    if source == 0:  # the one-source order of every earlier dtrain: a one-source run reads as before
        return seed * 1_000_003 + epoch
    digest = hashlib.sha256(f"{seed}/{source}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class DataOrder:
    """Global sample position p -> global row id (rows of source i are numbered after those of 0..i-1)."""

    def __init__(self, sizes, seed: int, shares=None):
        self.sizes = np.atleast_1d(np.asarray(sizes, dtype=np.int64))
        self.base = np.concatenate([[0], np.cumsum(self.sizes)])
        self.n = int(self.base[-1])
        self.seed = seed
        self.blend = Blend(np.ones(len(self.sizes)) if shares is None else shares)
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, source, epoch))
            n = int(self.sizes[source])
            self._perms[key] = (
                torch.randperm(n, generator=g).numpy().astype(np.int32 if n < 2**31 else np.int64)
            )
            while len(self._perms) > 2 * len(self.sizes):  # an epoch boundary needs two per source
                self._perms.popitem(last=False)
        return self._perms[key]

    def indices(self, start: int, count: int) -> np.ndarray:
        """Global row ids at positions start .. start + count - 1."""
        src, k = self.blend.draws(start, count)
        out = np.empty(count, dtype=np.int64)
        for i in np.unique(src):
            at = src == i
            epochs, offsets = np.divmod(k[at], self.sizes[i])
            rows = np.empty(len(epochs), dtype=np.int64)
            for e in np.unique(epochs):
                here = epochs == e
                rows[here] = self._perm(int(i), int(e))[offsets[here]]
            out[at] = rows + self.base[i]
        return out

    def index(self, position: int) -> int:
        return int(self.indices(position, 1)[0])

    def source_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.base, rows, side="right") - 1


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's micro-batches, from the endless `DataOrder` stream.

    Global micro-batch k covers positions [start + k*B*W, start + (k+1)*B*W); rank r takes its r-th
    slice of B. So the order depends only on (seed, position), never on how many processes read it.
    """

    def __init__(self, order: DataOrder, batch_size: int, rank: int, world_size: int, start: int = 0):
        self.batch_size, self.rank, self.world = batch_size, rank, world_size
        self.order, self.start = order, start

    def __iter__(self):
        position = self.start + self.rank * self.batch_size
        while True:
            yield self.order.indices(position, self.batch_size).tolist()
            position += self.batch_size * self.world


def train_loader(
    dataset,
    order: DataOrder,
    batch_size: int,
    rank: int,
    world_size: int,
    start: int,
    collator,
    num_workers: int,
    pin: bool,
):
    sampler = GlobalBatchSampler(order, batch_size, rank, world_size, start)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers, pin_memory=pin
    )

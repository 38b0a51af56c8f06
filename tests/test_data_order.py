"""dtrain.data.blend and dtrain.data.order: the prefix-stable blend of sources, the seeded per-source
epochs, and each rank's micro-batches (no training needed)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from dtrain.data import Collator, DataOrder, GlobalBatchSampler
from dtrain.data.blend import Blend, row_shares

# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def take(sampler: GlobalBatchSampler, steps: int) -> list[list[int]]:
    it = iter(sampler)
    return [next(it) for _ in range(steps)]


@pytest.mark.parametrize(("n", "batch"), [(37, 4), (12, 3), (5, 8)])
def test_world_two_equals_world_one_with_double_batch(n, batch):
    steps = 25
    rank0 = take(GlobalBatchSampler(DataOrder(n, 7), batch, rank=0, world_size=2), steps)
    rank1 = take(GlobalBatchSampler(DataOrder(n, 7), batch, rank=1, world_size=2), steps)
    single = take(GlobalBatchSampler(DataOrder(n, 7), 2 * batch, rank=0, world_size=1), steps)
    for step in range(steps):
        assert len(rank0[step]) == len(rank1[step]) == batch
        assert rank0[step] + rank1[step] == single[step]


@pytest.mark.parametrize(("n", "batch"), [(10, 3), (16, 4), (7, 10)])
def test_each_epoch_is_a_permutation(n, batch):
    epochs = 4
    stream = [
        i for b in take(GlobalBatchSampler(DataOrder(n, 3), batch, 0, 1), -(-epochs * n // batch)) for i in b
    ]
    orders = [stream[e * n : (e + 1) * n] for e in range(epochs)]
    for order in orders:
        assert sorted(order) == list(range(n))
    assert len({tuple(o) for o in orders}) > 1  # reshuffled per epoch


@pytest.mark.parametrize("start", [0, 1, 5, 13, 40])
def test_start_resumes_at_that_position(start):
    n, batch = 13, 3
    fresh = [i for b in take(GlobalBatchSampler(DataOrder(n, 11), batch, 0, 1), 40) for i in b]
    resumed = [i for b in take(GlobalBatchSampler(DataOrder(n, 11), batch, 0, 1, start=start), 20) for i in b]
    assert resumed == fresh[start : start + len(resumed)]


def test_resume_with_a_different_world_size():
    n, batch = 20, 2
    fresh = [i for b in take(GlobalBatchSampler(DataOrder(n, 5), 2 * batch, 0, 1), 10) for i in b]
    start = 12  # 3 global steps of 4 samples consumed
    r0 = take(GlobalBatchSampler(DataOrder(n, 5), batch, 0, 2, start=start), 5)
    r1 = take(GlobalBatchSampler(DataOrder(n, 5), batch, 1, 2, start=start), 5)
    merged = [i for a, b in zip(r0, r1, strict=True) for i in a + b]
    assert merged == fresh[start : start + len(merged)]


def test_seed_decides_the_order():
    a = take(GlobalBatchSampler(DataOrder(50, 1), 5, 0, 1), 10)
    b = take(GlobalBatchSampler(DataOrder(50, 2), 5, 0, 1), 10)
    again = take(GlobalBatchSampler(DataOrder(50, 1), 5, 0, 1), 10)
    assert a != b
    assert a == again


def test_sampler_drives_a_dataloader(tok):
    from dtrain.data import train_loader

    ds = datasets.Dataset.from_list([{"input_ids": [1] * (i + 1), "labels": [1] * (i + 1)} for i in range(6)])
    loader = train_loader(
        ds, DataOrder(6, 0), 2, 0, 1, start=0, collator=Collator(tok.pad_token_id), num_workers=0, pin=False
    )
    it = iter(loader)
    seen = []
    for _ in range(3):
        batch = next(it)
        assert batch["input_ids"].shape[0] == 2
        seen += batch["attention_mask"].sum(dim=1).tolist()
    assert sorted(seen) == [1, 2, 3, 4, 5, 6]  # one epoch: every example (length i+1) once


def test_one_source_reads_the_order_of_every_earlier_dtrain():
    """The historic order: one seeded torch permutation per epoch (a resumed run of an older dtrain reads
    the same rows)."""
    import torch

    n, seed = 17, 42
    order = DataOrder(n, seed)
    for epoch in range(3):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        assert order.indices(epoch * n, n).tolist() == torch.randperm(n, generator=g).tolist()


# --------------------------------------------------------------------------------------------
# The blend of several sources
# --------------------------------------------------------------------------------------------

SHARES = [[0.5, 0.5], [0.7, 0.2, 0.1], [0.999, 0.001], [1 / 3, 1 / 3, 1 / 3]]


@pytest.mark.parametrize("shares", SHARES)
def test_blend_is_prefix_stable_whatever_the_window(shares):
    blend = Blend(shares)
    whole_src, whole_k = blend.draws(0, 3000)
    rng = np.random.default_rng(0)
    cuts = sorted({0, 3000, *rng.integers(1, 3000, 12).tolist()})
    parts = [blend.draws(a, b - a) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), whole_src)
    assert np.array_equal(np.concatenate([p[1] for p in parts]), whole_k)
    far = blend.draws(10**9, 50)  # a window far into the stream, computed without walking to it
    assert len(far[0]) == 50 and (far[1] > 0).all()


@pytest.mark.parametrize("shares", SHARES)
def test_blend_tracks_the_shares_at_every_prefix(shares):
    src, k = Blend(shares).draws(0, 5000)
    for i, share in enumerate(shares):
        drawn = np.cumsum(src == i)
        expected = share * np.arange(1, len(src) + 1)
        assert np.abs(drawn - expected).max() <= 1.0 + 1e-9  # within one row at every prefix
        assert np.array_equal(k[src == i], np.arange(int(drawn[-1])))  # each source's draws in order


def test_row_shares_turn_token_weights_into_row_shares():
    shares = row_shares([3, 1], [100.0, 25.0])  # source 0's rows are four times as long
    assert np.allclose(shares, [3 / 7, 4 / 7])
    tokens = shares * [100.0, 25.0]
    assert np.allclose(tokens / tokens.sum(), [0.75, 0.25])


def test_a_mixture_oversamples_a_small_source_epoch_by_epoch_and_undersamples_a_large_one():
    sizes, shares = [5, 1000], [0.5, 0.5]
    order = DataOrder(sizes, seed=3, shares=shares)
    rows = order.indices(0, 400)
    src = order.source_of(rows)
    small = rows[src == 0]
    assert len(small) == 200  # 40 epochs of the small source...
    for e in range(40):  # ...each a fresh permutation: without replacement within an epoch
        assert sorted(small[5 * e : 5 * (e + 1)].tolist()) == list(range(5))
    assert len({tuple(small[5 * e : 5 * (e + 1)]) for e in range(40)}) > 1  # reshuffled
    large = rows[src == 1] - 5
    assert len(set(large.tolist())) == 200  # a fifth of one epoch of the large source, no repeats


@pytest.mark.parametrize("world", [2, 3])
def test_a_mixture_reads_the_same_rows_on_any_world_size_and_from_any_start(world):
    sizes, shares, batch = [7, 30, 11], [0.2, 0.5, 0.3], 2
    single = [
        i for b in take(GlobalBatchSampler(DataOrder(sizes, 9, shares), world * batch, 0, 1), 30) for i in b
    ]
    start = 4 * world * batch  # resumed after 4 global steps, on `world` ranks
    ranks = [
        take(GlobalBatchSampler(DataOrder(sizes, 9, shares), batch, r, world, start=start), 20)
        for r in range(world)
    ]
    merged = [i for step in zip(*ranks, strict=True) for b in step for i in b]
    assert merged == single[start : start + len(merged)]


def test_the_seed_and_the_weights_decide_a_mixture():
    a = DataOrder([10, 10], 1, [0.5, 0.5]).indices(0, 40)
    assert np.array_equal(a, DataOrder([10, 10], 1, [0.5, 0.5]).indices(0, 40))
    assert not np.array_equal(a, DataOrder([10, 10], 2, [0.5, 0.5]).indices(0, 40))
    assert not np.array_equal(a, DataOrder([10, 10], 1, [0.8, 0.2]).indices(0, 40))

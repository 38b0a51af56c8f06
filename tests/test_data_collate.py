"""dtrain.data.collate: padded batches, and each rank's eval batches."""

from __future__ import annotations

import datasets
import pytest
import torch

from dtrain.config import DataConfig
from dtrain.data import IGNORE_INDEX, Collator, encode, eval_batches, rank_shard

# --------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------


def test_collator_pads_to_longest_row(tok):
    rows = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8, 9, 10, 11, 12], "labels": [8, 9, 10, 11, 12]},
        {"input_ids": [13], "labels": [13]},
    ]
    batch = Collator(pad_id=tok.pad_token_id)(rows)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, 5)
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, tok.pad_token_id, tok.pad_token_id],
        [8, 9, 10, 11, 12],
        [13] + [tok.pad_token_id] * 4,
    ]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX],
        [8, 9, 10, 11, 12],
        [13] + [IGNORE_INDEX] * 4,
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


@pytest.mark.parametrize(
    ("longest", "multiple", "width"), [(5, 8, 8), (8, 8, 8), (9, 8, 16), (3, 1, 3), (1, 4, 4)]
)
def test_collator_pad_to_multiple_of(longest, multiple, width):
    rows = [{"input_ids": [3] * longest, "labels": [3] * longest}, {"input_ids": [4], "labels": [4]}]
    batch = Collator(pad_id=0, pad_to_multiple_of=multiple)(rows)
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"].sum().item() == longest + 1
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()


def test_collator_width_ignores_max_length(tok):
    out = [encode({"text": t}, tok, DataConfig(template="text", max_length=128)) for t in ("ab", "abcd")]
    batch = Collator(pad_id=tok.pad_token_id)([out[0], out[1]])
    assert batch["input_ids"].shape[1] == len(out[1]["input_ids"]) == 6  # <s> a b c d </s>


# --------------------------------------------------------------------------------------------
# Eval sharding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "world"), [(5, 2), (6, 3), (7, 4), (1, 3), (8, 1)])
def test_rank_shard_pads_to_equal_length(n, world):
    items = list(range(100, 100 + n))
    shards = [rank_shard(items, r, world) for r in range(world)]
    lengths = {len(s) for s, _ in shards}
    assert len(lengths) == 1
    assert lengths.pop() == -(-n // world)
    real = [s[:k] for s, k in shards]
    assert sorted(i for part in real for i in part) == items  # every real item exactly once
    for r, (s, k) in enumerate(shards):
        assert s[:k] == items[r::world]
        assert all(x == items[0] for x in s[k:])


def test_eval_batches_mask_padding_rows(tok):
    rows = [{"input_ids": [1, 10 + i, 11 + i, 2], "labels": [1, 10 + i, 11 + i, 2]} for i in range(5)]
    ds = datasets.Dataset.from_list(rows)
    collator = Collator(tok.pad_token_id)
    per_rank = {}
    for rank in range(2):
        batches = list(eval_batches(ds, 2, rank, 2, collator))
        per_rank[rank] = batches
        assert sum(b["input_ids"].shape[0] for b in batches) == 3  # ceil(5 / 2) rows on every rank
    # rank 1 holds examples 1, 3 and one padding row (a copy of example 0) whose labels are all masked
    last = per_rank[1][-1]
    assert last["input_ids"].shape[0] == 1
    assert last["input_ids"][0].tolist() == rows[0]["input_ids"]
    assert (last["labels"] == IGNORE_INDEX).all()
    # real rows keep their labels: every example's targets are counted exactly once over the ranks
    counted = sorted(
        tuple(row[row != IGNORE_INDEX].tolist())
        for batches in per_rank.values()
        for b in batches
        for row in b["labels"]
        if (row != IGNORE_INDEX).any()
    )
    assert counted == sorted(tuple(r["labels"]) for r in rows)

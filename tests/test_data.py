"""dtrain.data: tokenizing a dataset (counts, targets), collation, the global order and sampler, eval sharding."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from dtrain.config import DataConfig
from dtrain.data import (
    IGNORE_INDEX,
    Collator,
    GlobalBatchSampler,
    alpaca_prompt,
    build_data,
    eval_batches,
    load_table,
    rank_shard,
    tokenize,
)

ROWS = [
    {"instruction": "Reverse the letters.", "input": "abc", "output": "cba"},
    {"instruction": "Sort the letters.", "input": "dcba", "output": "abcd"},
    {"instruction": "Write it in capitals.", "input": "hey", "output": "HEY"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------
# Tokenizing a dataset
# --------------------------------------------------------------------------------------------


def test_tokenize_counts_truncated_and_keeps_every_row(tok):
    rows = [{"text": "a" * n} for n in (5, 50, 8, 100, 3)]
    ds = datasets.Dataset.from_list(rows)
    out, truncated, no_target, cache = tokenize(ds, tok, DataConfig(template="text", max_length=20), "train")
    assert cache == "off"  # an in-memory dataset has no cache to hit
    assert len(out) == len(rows)
    assert truncated == 2
    assert no_target == 0
    assert out.column_names == ["input_ids", "labels"]
    assert max(len(x) for x in out["input_ids"]) == 20


def test_a_second_tokenization_of_the_same_file_hits_the_datasets_cache(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": "ab" * n}) + "\n" for n in range(1, 30)))
    first = tokenize(load_table(str(path), "train", "data.path"), tok, DataConfig(template="text"), "train")
    again = tokenize(load_table(str(path), "train", "data.path"), tok, DataConfig(template="text"), "train")
    other = tokenize(
        load_table(str(path), "train", "data.path"), tok, DataConfig(template="text", max_length=9), "x"
    )
    assert (first[3], again[3], other[3]) == ("miss", "hit", "miss")  # a setting that changes tokens: a miss
    assert again[0]["input_ids"] == first[0]["input_ids"]


def test_build_data_counts_truncated_examples_never_drops_them(tok, tmp_path):
    train = [{"instruction": "Copy.", "input": "x" * n, "output": "y" * n} for n in (1, 5, 40, 60, 2, 3)]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "eval.jsonl", train[:3])
    prompt_len = (
        len(tok(alpaca_prompt(train[0]), add_special_tokens=True)["input_ids"]) - 1
    )  # minus the 1 input char
    max_length = 64
    expected_trunc = sum(1 for r in train if prompt_len + 2 * len(r["input"]) + 1 > max_length)
    data = build_data(
        DataConfig(template="alpaca", max_length=max_length),
        tok,
        str(tmp_path / "train.jsonl"),
        str(tmp_path / "eval.jsonl"),
        seed=0,
        num_generate=2,
    )
    assert len(data.train) == len(train)
    assert len(data.eval) == 3
    assert data.stats["train_examples"] == len(train)
    assert data.stats["train_truncated"] == expected_trunc == 2
    assert data.stats["eval_examples"] == 3
    assert data.stats["eval_truncated"] == 1
    assert all(len(x) <= max_length for x in data.train["input_ids"])
    assert [g["reference"] for g in data.generate] == ["y", "yyyyy"]


def test_build_data_holds_out_eval_fraction(tok, tmp_path):
    rows = [{"instruction": "Copy.", "input": str(i), "output": str(i)} for i in range(50)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    data = build_data(
        DataConfig(template="alpaca", eval_fraction=0.1),
        tok,
        str(tmp_path / "train.jsonl"),
        None,
        seed=1,
        num_generate=100,
    )
    assert len(data.train) + len(data.eval) == 50
    assert len(data.eval) == 5
    train_text = {tok.decode(x) for x in data.train["input_ids"]}
    eval_text = {tok.decode(x) for x in data.eval["input_ids"]}
    assert not train_text & eval_text
    assert len(data.generate) == 5


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
    ds = datasets.Dataset.from_list([{"text": "ab"}, {"text": "abcd"}])
    out, _, _, _ = tokenize(ds, tok, DataConfig(template="text", max_length=128), "x")
    batch = Collator(pad_id=tok.pad_token_id)([out[0], out[1]])
    assert batch["input_ids"].shape[1] == len(out[1]["input_ids"]) == 6  # <s> a b c d </s>


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def take(sampler: GlobalBatchSampler, steps: int) -> list[list[int]]:
    it = iter(sampler)
    return [next(it) for _ in range(steps)]


@pytest.mark.parametrize(("n", "batch"), [(37, 4), (12, 3), (5, 8)])
def test_world_two_equals_world_one_with_double_batch(n, batch):
    steps = 25
    rank0 = take(GlobalBatchSampler(n, batch, rank=0, world_size=2, seed=7), steps)
    rank1 = take(GlobalBatchSampler(n, batch, rank=1, world_size=2, seed=7), steps)
    single = take(GlobalBatchSampler(n, 2 * batch, rank=0, world_size=1, seed=7), steps)
    for step in range(steps):
        assert len(rank0[step]) == len(rank1[step]) == batch
        assert rank0[step] + rank1[step] == single[step]


@pytest.mark.parametrize(("n", "batch"), [(10, 3), (16, 4), (7, 10)])
def test_each_epoch_is_a_permutation(n, batch):
    epochs = 4
    stream = [i for b in take(GlobalBatchSampler(n, batch, 0, 1, seed=3), -(-epochs * n // batch)) for i in b]
    orders = [stream[e * n : (e + 1) * n] for e in range(epochs)]
    for order in orders:
        assert sorted(order) == list(range(n))
    assert len({tuple(o) for o in orders}) > 1  # reshuffled per epoch


@pytest.mark.parametrize("start", [0, 1, 5, 13, 40])
def test_start_resumes_at_that_position(start):
    n, batch = 13, 3
    fresh = [i for b in take(GlobalBatchSampler(n, batch, 0, 1, seed=11), 40) for i in b]
    resumed = [i for b in take(GlobalBatchSampler(n, batch, 0, 1, seed=11, start=start), 20) for i in b]
    assert resumed == fresh[start : start + len(resumed)]


def test_resume_with_a_different_world_size():
    n, batch = 20, 2
    fresh = [i for b in take(GlobalBatchSampler(n, 2 * batch, 0, 1, seed=5), 10) for i in b]
    start = 12  # 3 global steps of 4 samples consumed
    r0 = take(GlobalBatchSampler(n, batch, 0, 2, seed=5, start=start), 5)
    r1 = take(GlobalBatchSampler(n, batch, 1, 2, seed=5, start=start), 5)
    merged = [i for a, b in zip(r0, r1, strict=True) for i in a + b]
    assert merged == fresh[start : start + len(merged)]


def test_seed_decides_the_order():
    a = take(GlobalBatchSampler(50, 5, 0, 1, seed=1), 10)
    b = take(GlobalBatchSampler(50, 5, 0, 1, seed=2), 10)
    again = take(GlobalBatchSampler(50, 5, 0, 1, seed=1), 10)
    assert a != b
    assert a == again


def test_sampler_drives_a_dataloader(tok):
    from dtrain.data import train_loader

    ds = datasets.Dataset.from_list([{"input_ids": [1] * (i + 1), "labels": [1] * (i + 1)} for i in range(6)])
    loader = train_loader(
        ds, 2, 0, 1, seed=0, start=0, collator=Collator(tok.pad_token_id), num_workers=0, pin=False
    )
    it = iter(loader)
    seen = []
    for _ in range(3):
        batch = next(it)
        assert batch["input_ids"].shape[0] == 2
        seen += batch["attention_mask"].sum(dim=1).tolist()
    assert sorted(seen) == [1, 2, 3, 4, 5, 6]  # one epoch: every example (length i+1) once


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

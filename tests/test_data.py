"""dtrain.data: loading, templates with prompt masking, truncation, collation, sampling, eval sharding."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch

from dtrain.config import DataConfig, UserError
from dtrain.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    Collator,
    GlobalBatchSampler,
    alpaca_prompt,
    build_data,
    check_columns,
    encode,
    eval_batches,
    generation_item,
    load_table,
    rank_shard,
    tokenize,
)
from dtrain.tasks import build_char_tokenizer

ROWS = [
    {"instruction": "Reverse the letters.", "input": "abc", "output": "cba"},
    {"instruction": "Sort the letters.", "input": "dcba", "output": "abcd"},
    {"instruction": "Write it in capitals.", "input": "hey", "output": "HEY"},
]

CONVERSATION = [
    {"role": "system", "content": "SYSTEMTEXT"},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "FIRST REPLY"},
    {"role": "user", "content": "again please"},
    {"role": "assistant", "content": "SECOND REPLY"},
]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def trained(encoded: dict) -> list[int]:
    return [t for t in encoded["labels"] if t != IGNORE_INDEX]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------


def test_alpaca_masks_exactly_the_prompt(tok):
    row = ROWS[0]
    enc = encode(row, tok, DataConfig(template="alpaca"))
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    assert enc["truncated"] is False
    prompt_ids = tok(alpaca_prompt(row), add_special_tokens=True)["input_ids"]
    n = len(prompt_ids)
    assert ids[:n] == prompt_ids
    assert labels[:n] == [IGNORE_INDEX] * n  # every prompt token masked
    assert all(t != IGNORE_INDEX for t in labels[n:])  # nothing after it masked
    assert labels[n:] == ids[n:]  # targets are the input tokens themselves
    assert tok.decode(trained(enc)) == row["output"] + tok.eos_token
    assert labels[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == ALPACA_PROMPT.format(**row) + row["output"]


@pytest.mark.parametrize(
    "row",
    [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say hi.", "input": "", "output": "hi"}],
)
def test_alpaca_without_input_uses_no_input_prompt(tok, row):
    assert alpaca_prompt(row) == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
    enc = encode(row, tok, DataConfig(template="alpaca"))
    text = tok.decode(enc["input_ids"], skip_special_tokens=True)
    assert "### Input:" not in text
    assert text == "### Instruction:\nSay hi.\n\n### Response:\nhi"
    assert tok.decode(trained(enc)) == "hi" + tok.eos_token


def test_alpaca_numeric_output_is_stringified(tok):
    enc = encode(
        {"instruction": "Add the numbers.", "input": "2+3", "output": 5}, tok, DataConfig(template="alpaca")
    )
    assert tok.decode(trained(enc)) == "5" + tok.eos_token


def test_chat_trains_only_on_assistant_turns(tok):
    cfg = DataConfig(template="chat")
    enc = encode({"messages": CONVERSATION}, tok, cfg)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(ids) == full
    target_text = tok.decode(trained(enc))
    for turn in ("FIRST REPLY", "SECOND REPLY"):
        assert turn + tok.eos_token in target_text
    for text in ("SYSTEMTEXT", "hello there", "again please", "<|user|>", "<|assistant|>", "<|system|>"):
        assert text not in target_text
    # unmasked tokens are exactly where they are in the input, in two separate runs (one per reply)
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(labels, ids, strict=True))
    runs, current = [], []
    for lab in [*labels, IGNORE_INDEX]:
        if lab != IGNORE_INDEX:
            current.append(lab)
        elif current:
            runs.append(tok.decode(current))
            current = []
    assert len(runs) == 2
    for run, reply in zip(runs, ("FIRST REPLY", "SECOND REPLY"), strict=True):
        # the reply and its EOS, at most followed by the template's separator whitespace
        assert re.fullmatch(re.escape(reply + tok.eos_token) + r"\s*", run), run


def test_chat_single_turn_target_starts_at_the_reply(tok):
    messages = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    enc = encode({"conv": messages}, tok, DataConfig(template="chat", messages_column="conv"))
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(enc["labels"][n_prompt : n_prompt + 5]) == "pong" + tok.eos_token


def test_chat_generation_item_prompts_for_the_last_reply(tok):
    item = generation_item({"messages": CONVERSATION}, tok, DataConfig(template="chat"))
    assert item["reference"] == "SECOND REPLY"
    prompt = tok.decode(item["prompt_ids"])
    assert prompt.endswith("again please\n<|assistant|>")
    assert "SECOND REPLY" not in prompt


def test_text_template_trains_on_every_token(tok):
    enc = encode({"body": "plain text, all trained"}, tok, DataConfig(template="text", text_column="body"))
    assert enc["labels"] == enc["input_ids"]
    assert IGNORE_INDEX not in enc["labels"]
    assert enc["input_ids"][0] == tok.bos_token_id
    assert enc["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "plain text, all trained"
    assert generation_item({"body": "x"}, tok, DataConfig(template="text", text_column="body")) is None


def test_text_truncation_cuts_the_end(tok):
    row = {"text": "z" * 200}
    long = encode(row, tok, DataConfig(template="text", max_length=40))
    full = encode(row, tok, DataConfig(template="text", max_length=10_000))
    assert long["truncated"] is True and full["truncated"] is False
    assert long["input_ids"] == full["input_ids"][:40] and long["labels"] == full["labels"][:40]


def test_alpaca_truncation_keeps_the_response_and_the_end_of_the_instruction(tok):
    row = {"instruction": "A" * 100 + " then the last words", "output": "ANSWER"}
    enc = encode(row, tok, DataConfig(template="alpaca", max_length=60))
    assert enc["truncated"] is True and len(enc["input_ids"]) == 60
    assert tok.decode(trained(enc)) == "ANSWER" + tok.eos_token  # every target token survives
    text = tok.decode(enc["input_ids"], skip_special_tokens=True)
    assert text.startswith("### Instruction:\n")  # the marker before the dropped content stays
    assert text.endswith("the last words\n\n### Response:\nANSWER")
    assert "A" * 100 not in text  # the start of the instruction went first


def test_alpaca_truncation_drops_the_instruction_before_the_input_end(tok):
    row = {"instruction": "I" * 30, "input": "J" * 30 + "end of input", "output": "OUT"}
    enc = encode(row, tok, DataConfig(template="alpaca", max_length=70))
    text = tok.decode(enc["input_ids"], skip_special_tokens=True)
    assert "I" not in text.replace("### Instruction", "").replace("### Input", "")
    assert text.endswith("end of input\n\n### Response:\nOUT") and "### Instruction:\n" in text
    assert tok.decode(trained(enc)) == "OUT" + tok.eos_token


def test_alpaca_response_longer_than_the_budget_is_cut_at_its_end(tok):
    row = {"instruction": "Copy.", "input": "x", "output": "y" * 200}
    enc = encode(row, tok, DataConfig(template="alpaca", max_length=40))
    assert len(enc["input_ids"]) == 40
    text = tok.decode(enc["input_ids"], skip_special_tokens=True)
    assert text.endswith("### Response:\n" + "y" * (40 - 20))  # at most half the budget for markers
    assert "Copy." not in text and "x" not in text  # content goes before any response token
    assert len(trained(enc)) == 20


def test_prompt_markers_go_from_the_start_when_content_is_not_enough(tok):
    row = {"instruction": "ab", "output": "RESPONSE"}
    full = encode(row, tok, DataConfig(template="alpaca", max_length=1000))
    n = len(full["input_ids"]) - 4  # more than the 2 content tokens must go
    enc = encode(row, tok, DataConfig(template="alpaca", max_length=n))
    assert len(enc["input_ids"]) == n
    assert enc["input_ids"][-10:] == full["input_ids"][-10:]
    assert tok.decode(trained(enc)) == "RESPONSE" + tok.eos_token


def test_chat_truncation_drops_old_turns_first_and_keeps_the_last_reply(tok):
    conv = [
        {"role": "user", "content": "OLD" * 20},
        {"role": "assistant", "content": "old reply"},
        {"role": "user", "content": "new question"},
        {"role": "assistant", "content": "NEW REPLY"},
    ]
    full = encode({"messages": conv}, tok, DataConfig(template="chat", max_length=1000))
    enc = encode({"messages": conv}, tok, DataConfig(template="chat", max_length=len(full["input_ids"]) - 50))
    text = tok.decode(enc["input_ids"])
    assert text.endswith("<|user|>new question\n<|assistant|>NEW REPLY" + tok.eos_token)
    assert "OLD" * 5 not in text and text.count("<|user|>") == 2  # content went, markers stayed
    assert "NEW REPLY" + tok.eos_token in tok.decode(trained(enc))


def test_exactly_max_length_is_not_truncated(tok):
    n = len(encode({"text": "abcdef"}, tok, DataConfig(template="text"))["input_ids"])
    enc = encode({"text": "abcdef"}, tok, DataConfig(template="text", max_length=n))
    assert enc["truncated"] is False and len(enc["input_ids"]) == n
    enc = encode({"text": "abcdef"}, tok, DataConfig(template="text", max_length=n - 1))
    assert enc["truncated"] is True and len(enc["input_ids"]) == n - 1


def test_tokenize_counts_truncated_and_keeps_every_row(tok):
    rows = [{"text": "a" * n} for n in (5, 50, 8, 100, 3)]
    ds = datasets.Dataset.from_list(rows)
    out, truncated, no_target = tokenize(ds, tok, DataConfig(template="text", max_length=20), "train")
    assert len(out) == len(rows)
    assert truncated == 2
    assert no_target == 0
    assert out.column_names == ["input_ids", "labels"]
    assert max(len(x) for x in out["input_ids"]) == 20


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
    out, _, _ = tokenize(ds, tok, DataConfig(template="text", max_length=128), "x")
    batch = Collator(pad_id=tok.pad_token_id)([out[0], out[1]])
    assert batch["input_ids"].shape[1] == len(out[1]["input_ids"]) == 6  # <s> a b c d </s>


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _write(fmt: str, directory: Path, rows: list[dict]) -> Path:
    df = pd.DataFrame(rows)
    if fmt == "json":
        path = directory / "data.json"
        df.to_json(path, orient="records")
    elif fmt == "jsonl":
        path = directory / "data.jsonl"
        df.to_json(path, orient="records", lines=True)
    elif fmt == "csv":
        path = directory / "data.csv"
        df.to_csv(path, index=False)
    elif fmt == "parquet":
        path = directory / "data.parquet"
        df.to_parquet(path)
    else:
        path = directory / "saved"
        datasets.Dataset.from_dict(df.to_dict(orient="list")).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet", "saved"])
def test_load_table_formats(tmp_path, fmt):
    path = _write(fmt, tmp_path, ROWS)
    ds = load_table(str(path), "train", "data.path")
    assert isinstance(ds, datasets.Dataset)
    assert len(ds) == len(ROWS)
    assert sorted(ds.column_names) == ["input", "instruction", "output"]
    assert [dict(r) for r in ds] == ROWS


def test_load_table_saved_dataset_dict_picks_split(tmp_path):
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_table(str(tmp_path / "dd"), "train", "data.path")) == 3
    assert len(load_table(str(tmp_path / "dd"), "test", "data.path")) == 1
    with pytest.raises(UserError, match="no split 'validation'"):
        load_table(str(tmp_path / "dd"), "validation", "data.path")


def test_load_table_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(UserError) as info:
        load_table(str(path), "train", "data.eval_path")
    assert "--data.eval_path" in str(info.value)
    assert str(path) in str(info.value)


def test_load_table_unsupported_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("instruction,output\na,b\n")
    with pytest.raises(UserError) as info:
        load_table(str(path), "train", "data.path")
    assert "--data.path" in str(info.value)
    assert "'.txt'" in str(info.value)


def test_load_table_unparseable_file_is_a_user_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="--data.path: could not load"):
        load_table(str(path), "train", "data.path")


def test_load_table_empty_saved_dataset_has_no_rows(tmp_path):
    empty = datasets.Dataset.from_list(ROWS).filter(lambda _: False)
    empty.save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(UserError) as info:
        load_table(str(tmp_path / "empty"), "train", "data.path")
    assert "no rows" in str(info.value)
    assert "--data.path" in str(info.value)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_load_table_blank_file_has_no_rows(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(UserError) as info:
        load_table(str(path), "train", "data.path")
    assert "no rows" in str(info.value)
    assert "--data.path" in str(info.value)


def _empty_json_list(d: Path) -> Path:
    (d / "empty.json").write_text("[]")
    return d / "empty.json"


def _header_only_csv(d: Path) -> Path:
    (d / "empty.csv").write_text("instruction,input,output\n")
    return d / "empty.csv"


def _empty_parquet(d: Path) -> Path:
    pd.DataFrame({"instruction": pd.Series([], dtype=str), "output": pd.Series([], dtype=str)}).to_parquet(
        d / "empty.parquet"
    )
    return d / "empty.parquet"


def _empty_saved_from_dict(d: Path) -> Path:
    datasets.Dataset.from_dict({"instruction": [], "output": []}).save_to_disk(str(d / "saved"))
    return d / "saved"


@pytest.mark.parametrize("make", [_empty_json_list, _header_only_csv, _empty_parquet, _empty_saved_from_dict])
def test_load_table_zero_row_file_has_no_rows(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(UserError) as info:
        load_table(str(path), "train", "data.path")
    assert "no rows" in str(info.value)


def test_check_columns_names_missing_column_and_template(tmp_path):
    ds = datasets.Dataset.from_list([{"instruction": "a", "input": "b"}])
    with pytest.raises(UserError) as info:
        check_columns(ds, DataConfig(template="alpaca"), "train.jsonl", "data.path")
    message = str(info.value)
    assert "'output'" in message
    assert "alpaca" in message
    assert "--data.path" in message
    assert "'instruction'" not in message.split("(it has")[0]  # only the missing one is listed as missing

    with pytest.raises(UserError) as info:
        check_columns(ds, DataConfig(template="chat", messages_column="conv"), "x", "data.eval_path")
    assert "'conv'" in str(info.value) and "chat" in str(info.value) and "--data.eval_path" in str(info.value)

    with pytest.raises(UserError) as info:
        check_columns(ds, DataConfig(template="text"), "x", "data.path")
    assert "'text'" in str(info.value) and "template text" in str(info.value)


def test_check_columns_accepts_matching_columns():
    ds = datasets.Dataset.from_list([{"instruction": "a", "output": "b"}])
    assert check_columns(ds, DataConfig(template="alpaca"), "x", "data.path") is None  # does not raise


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

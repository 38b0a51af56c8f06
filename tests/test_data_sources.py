"""dtrain.data.sources: loading the user's table in every supported form, and checking its columns."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from dtrain.config import DataConfig, UserError
from dtrain.data.sources import check_columns, load_table

ROWS = [
    {"instruction": "Reverse the letters.", "input": "abc", "output": "cba"},
    {"instruction": "Sort the letters.", "input": "dcba", "output": "abcd"},
    {"instruction": "Write it in capitals.", "input": "hey", "output": "HEY"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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

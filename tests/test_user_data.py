"""The script on a user's own model directory and data files, for each template, and the shipped recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, assert_ok, read_metrics, run_train, train_rows

from dtrain.config import parse_config

FAST = [
    "--train.max_steps",
    "4",
    "--train.per_device_batch_size",
    "4",
    "--eval.steps",
    "0",
    "--checkpoint.save_steps",
    "0",
    "--log.every_steps",
    "1",
    "--log.progress_bar",
    "false",
    "--log.plots",  # the tests' recipes draw nothing (dtrain plot draws afterwards)
    "false",
    "--eval.max_new_tokens",
    "4",
    "--optim.lr",
    "1e-2",
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _reloads(final: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    out = model.generate(**tok("hi", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 2


def test_alpaca_file_with_local_model(tmp_path, tiny_model_dir):
    rows = [
        {"instruction": "Echo.", "input": w, "output": w}
        for w in ("abc", "xyz", "hello", "world", "dog", "cat")
    ] * 8
    data = _jsonl(tmp_path / "alpaca.jsonl", rows)
    out = tmp_path / "run"
    proc = run_train(
        [
            "--model.name_or_path",
            str(tiny_model_dir),
            "--data.path",
            str(data),
            "--data.template",
            "alpaca",
            "--data.eval_fraction",
            "0.25",
            "--output_dir",
            str(out),
            *FAST,
        ]
    )
    assert_ok(proc)
    info = json.loads((out / "run_info.json").read_text())
    assert info["data"]["train_examples"] == 36 and info["data"]["eval_examples"] == 12
    evals = [r for r in read_metrics(out) if "eval_exact_match" in r]
    assert len(evals) == 1 and 0.0 <= evals[0]["eval_exact_match"] <= 1.0
    _reloads(out / "final")


def test_chat_file(tmp_path, tiny_model_dir):
    conv = [
        {"role": "user", "content": "say yes"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "say no"},
        {"role": "assistant", "content": "no"},
    ]
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": conv}] * 20)
    eval_data = _jsonl(tmp_path / "chat_eval.jsonl", [{"messages": conv}] * 4)
    out = tmp_path / "run"
    proc = run_train(
        [
            "--model.name_or_path",
            str(tiny_model_dir),
            "--data.path",
            str(data),
            "--data.eval_path",
            str(eval_data),
            "--data.template",
            "chat",
            "--output_dir",
            str(out),
            *FAST,
        ]
    )
    assert_ok(proc)
    rows = train_rows(out)
    assert len(rows) == 4 and rows[-1]["loss"] < rows[0]["loss"]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["reference"] == "no"  # the last assistant turn is the reference


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_text_template_splits_long_documents_and_counts(tmp_path, tiny_model_dir, fmt):
    import pandas as pd

    texts = ["short text", "x" * 200, "another short one", "y" * 300] * 5
    path = tmp_path / f"corpus.{fmt}"
    frame = pd.DataFrame({"text": texts})
    frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path)
    out = tmp_path / "run"
    proc = run_train(
        [
            "--model.name_or_path",
            str(tiny_model_dir),
            "--data.path",
            str(path),
            "--data.template",
            "text",
            "--data.max_length",
            "32",
            "--data.eval_fraction",
            "0.2",
            "--eval.num_generate",
            "0",
            "--output_dir",
            str(out),
            *FAST,
        ]
    )
    assert_ok(proc)
    info = json.loads((out / "run_info.json").read_text())["data"]
    assert info["train_documents"] + info["eval_documents"] == 20  # none dropped
    assert info["train_truncated"] == info["eval_truncated"] == 0  # none cut either: split into pieces
    pieces = info["train_examples"] + info["eval_examples"]
    assert pieces > 20 and info["train_tokens"] >= info["train_examples"] * 2
    # the start-up line says it in words
    assert f"{info['train_examples']} train examples from {info['train_documents']} documents" in proc.stdout


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "dtrain" / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_parses(recipe, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b", "text": "c"}])
    path = REPO / "dtrain" / "recipes" / recipe
    sources = yaml.safe_load(path.read_text()).get("data", {}).get("sources")
    if sources:  # the recipe's own mixture, each source pointed at a file that exists here
        moved = [
            {**s, "path": str(_jsonl(tmp_path / f"{i}.jsonl", [{"text": "c"}]))}
            for i, s in enumerate(sources)
        ]
        cfg = parse_config(["--config", str(path), "--data.sources", json.dumps(moved)])
        assert len(cfg.data.sources) == len(sources) and cfg.data.packing
    else:
        cfg = parse_config(["--config", str(path), "--data.path", str(data)])
    assert cfg.train.max_steps or cfg.train.num_epochs

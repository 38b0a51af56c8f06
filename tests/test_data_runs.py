"""The data package in real runs: a weighted mixture of a text corpus (long documents split into pieces) and
an alpaca source, packed; killed mid-run and resumed from a `dtrain prepare` directory of the same data, it
logs bitwise the losses of the straight run on the raw files. The realised shares sit beside the targets."""

from __future__ import annotations

import json
import time

import pytest
from conftest import (
    TINY,
    assert_ok,
    kill_after_checkpoints,
    read_metrics,
    run_dtrain,
    run_train,
    train_rows,
)

pytestmark = pytest.mark.slow

STEPS = 40


def write_sources(root):
    import numpy as np

    rng = np.random.default_rng(0)
    with open(root / "web.jsonl", "w") as fh:
        for i in range(120):
            n = int(rng.choice([5, 20, 60, 150, 700]))
            fh.write(json.dumps({"text": "".join(rng.choice(list("abcdefgh "), n)) + str(i % 10)}) + "\n")
    with open(root / "qa.jsonl", "w") as fh:
        for i in range(80):
            word = "".join(rng.choice(list("xyz"), 2 + i % 5))
            fh.write(json.dumps({"instruction": f"Reverse: {word}", "output": word[::-1]}) + "\n")
    recipe = root / "mix.yaml"
    recipe.write_text(
        "data:\n"
        "  sources:\n"
        f"    - {{path: {root / 'web.jsonl'}, template: text, weight: 3}}\n"
        f"    - {{path: {root / 'qa.jsonl'}, template: alpaca, weight: 1, name: sft}}\n"
        "  max_length: 64\n"
        "  packing: true\n"
    )
    return recipe


def flags(recipe) -> list[str]:
    return [
        *TINY,
        "--config",
        str(recipe),
        "--train.max_steps",
        str(STEPS),
        "--checkpoint.save_steps",
        "8",
        "--eval.steps",
        "20",
        "--eval.num_generate",
        "0",
        "--log.every_steps",
        "1",
    ]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    recipe = write_sources(root)
    out = root / "straight"
    proc = run_train([*flags(recipe), "--output_dir", str(out)])
    assert_ok(proc)
    return root, recipe, out, proc


def test_a_mixture_logs_its_shares_beside_the_targets_and_evals_every_source(straight):
    _, _, out, proc = straight
    assert "dtrain: data sources: web 75.0% of tokens" in proc.stdout and "sft 25.0% of tokens" in proc.stdout
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    last = rows[-1]
    assert abs(last["share/web"] - 0.75) < 0.05 and abs(last["share/sft"] - 0.25) < 0.05
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert evals and all({"eval_loss/web", "eval_loss/sft"} <= set(r) for r in evals)
    for r in evals:  # the overall loss is over all held-out tokens: between the two sources' losses
        assert (
            min(r["eval_loss/web"], r["eval_loss/sft"])
            <= r["eval_loss"]
            <= max(r["eval_loss/web"], r["eval_loss/sft"])
        )
    info = json.loads((out / "run_info.json").read_text())
    assert info["data"]["sources"]["web"]["target_share"] == 0.75
    assert (
        info["data"]["train_truncated"] == 0
        and info["data"]["train_examples"] > info["data"]["train_documents"]
    )
    ended = info["ended"]["data_sources"]
    assert ended["web"]["target_share"] == 0.75 and abs(ended["web"]["token_share"] - 0.75) < 0.05
    # every row consumed (global batch 4), counted once
    assert sum(v["rows"] for v in ended.values()) == STEPS * 4


def test_a_killed_mixture_resumes_from_a_prepared_directory_with_bitwise_equal_losses(straight):
    root, recipe, straight_out, _ = straight
    reference = {r["step"]: r["loss"] for r in train_rows(straight_out)}
    prepared = root / "prepared"
    proc = run_dtrain("prepare", "--config", str(recipe), str(prepared), "--num-proc", "2", *TINY[2:])
    assert_ok(proc)
    assert "web:" in proc.stdout and (prepared / "manifest.json").is_file()
    again = run_dtrain("prepare", "--config", str(recipe), str(prepared), *TINY[2:])
    assert_ok(again)
    assert "nothing to do" in again.stdout  # the same data: not tokenized twice

    out = root / "killed"
    kill_after_checkpoints(flags(recipe), out)
    resumed = run_train([*flags(recipe), "--data.prepared", str(prepared), "--output_dir", str(out)])
    assert_ok(resumed)
    # allowed: a harmless change
    assert "resuming from" in resumed.stdout and "data.prepared None ->" in resumed.stdout
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert {r["step"]: r["loss"] for r in rows} == reference  # bitwise


def test_a_prepared_directory_of_other_settings_is_refused_in_one_line(straight, tmp_path):
    root, recipe, _, _ = straight
    prepared = root / "prepared-64"
    assert_ok(run_dtrain("prepare", "--config", str(recipe), str(prepared), *TINY[2:]))
    proc = run_train(
        [
            *flags(recipe),
            "--data.prepared",
            str(prepared),
            "--data.max_length",
            "48",
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "--data.max_length is 48 here, 64 there" in errors[0] and "dtrain prepare" in errors[0]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    proc = run_dtrain("prepare", "--config", str(recipe), str(busy), *TINY[2:])
    assert proc.returncode == 2 and "already exists and holds other files; nothing was changed" in proc.stderr
    assert (busy / "keep.txt").read_text() == "mine" and sorted(p.name for p in busy.iterdir()) == [
        "keep.txt"
    ]


def test_a_checkpoint_of_the_old_data_format_is_refused_where_its_stream_would_differ(straight, tmp_path):
    import shutil

    _, recipe, out, _ = straight
    run = tmp_path / "old"
    shutil.copytree(out, run)
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    for ckpt in checkpoints:
        marker = json.loads((ckpt / "dtrain_checkpoint.json").read_text())
        assert marker["data_format"] == 2
        del marker["data_format"]  # what a dtrain before the data package wrote: format 1
        (ckpt / "dtrain_checkpoint.json").write_text(json.dumps(marker))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    proc = run_train([*flags(recipe), "--train.max_steps", str(STEPS + 4), "--output_dir", str(run)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "data format 1" in errors[0] and "same data position would read other data" in errors[0]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before  # nothing touched


def test_a_data_error_on_the_main_process_ends_every_rank_in_one_line_not_a_hang(straight, tmp_path):
    """`dtrain launch ddp --cpu`, 2 gloo ranks: rank 0 prepares, rank 1 waits on a status file (no
    collective). A source that fails to load reaches rank 1 as rank 0's own line; the job ends at once."""
    from conftest import dtrain_launch

    root, recipe, _, _ = straight
    broken = tmp_path / "qa.jsonl"
    lines = (root / "qa.jsonl").read_text().splitlines()
    broken.write_text("\n".join([*lines[:4], '{"instruction": oops}', *lines[4:]]) + "\n")
    mix = tmp_path / "mix.yaml"
    mix.write_text(recipe.read_text().replace(str(root / "qa.jsonl"), str(broken)))
    started = time.time()
    proc = dtrain_launch("ddp", [*flags(mix), "--output_dir", str(tmp_path / "run")])
    assert proc.returncode == 2 and time.time() - started < 120, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert errors and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert all("--data.sources[1].path" in e and "line 5" in e for e in errors), errors
    assert len(errors) == 1  # rank 0's own line; rank 1, which was waiting for it, holds the same one back

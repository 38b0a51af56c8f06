"""The embedded default run, exactly as `python dtrain/train.py` runs it (about 2 minutes on 2 cores).

This is the quick-start promise: with no arguments and no network the script trains something real,
and the task metric (exact match of greedy answers on held-out prompts) rises far above the
untrained model's.
"""

from __future__ import annotations

import json

import pytest
from conftest import assert_ok, read_metrics, run_train, train_rows
from test_quiet import assert_first_screen_is_dtrains

pytestmark = pytest.mark.slow


def test_default_run_learns_the_tasks(tmp_path):
    out = tmp_path / "default"
    # as a user runs it: Python's own warning filters, not the suite's PYTHONWARNINGS=ignore
    proc = run_train(
        ["--output_dir", str(out), "--eval.at_start", "true", "--log.progress_bar", "false"],
        PYTHONWARNINGS="",
    )
    assert_ok(proc)
    assert_first_screen_is_dtrains(proc)
    evals = [r for r in read_metrics(out) if "eval_exact_match" in r]
    assert [r["step"] for r in evals] == [0, 250, 500, 750, 1000]
    before, after = evals[0], evals[-1]
    assert before["eval_exact_match"] <= 0.02  # the untrained model answers nothing right
    assert after["eval_exact_match"] >= 0.35, after  # measured 0.59 on 2 CPU cores
    assert after["eval_exact_match/upper"] >= 0.5  # the easiest task is learned for sure
    assert after["eval_loss"] < before["eval_loss"] / 5
    rows = train_rows(out)
    assert rows[-1]["step"] == 1000 and rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    info = json.loads((out / "run_info.json").read_text())
    assert info["data"]["train_examples"] == 20000 and info["data"]["eval_examples"] == 256
    # --log.plots is on for users: the run drew its curves and wrote summary.md with them embedded
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {"loss.png", "eval_loss.png", "exact_match.png", "lr.png", "grad_norm.png"} <= plots
    summary = (out / "summary.md").read_text()
    assert "**finished** at step 1000" in summary and "![loss](plots/loss.png)" in summary
    assert f"{after['eval_exact_match']:.4f}" in summary

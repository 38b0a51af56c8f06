"""dtrain/plots.py: the PNGs of a real short run hold one point per metrics.jsonl row, a killed run draws
what it can and says what it skipped, runs overlay, `plot-lr` draws the run's own scheduler, and a run
without matplotlib trains and says so once.

One real run (the smoke recipe with --log.plots true, so the eval and end-of-run hooks draw) is shared by
this file and tests/test_summary.py; every other case is a cheap copy of its files, edited.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY, assert_ok, env_for_subprocess, read_metrics, run_dtrain, run_train

from dtrain import plots
from dtrain.config import UserError, parse_config

_RUN: dict[str, Path] = {}


def shared_run(tmp_path_factory) -> Path:
    """The one real run of both files (made on first use)."""
    if "run" not in _RUN:
        out = tmp_path_factory.mktemp("plotted") / "smoke"
        assert_ok(run_train([*TINY, "--log.plots", "true", "--output_dir", str(out)]))
        _RUN["run"] = out
    return _RUN["run"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return shared_run(tmp_path_factory)


def copy_run(src: Path, dest: Path) -> Path:
    """The run's files without its checkpoints, data or plots: what drawing and the summary read."""
    dest.mkdir(parents=True)
    for name in ("metrics.jsonl", "run_info.json", "config.yaml"):
        shutil.copy(src / name, dest / name)
    return dest


def rows_with(rows: list[dict], key: str) -> int:
    return sum(1 for r in rows if isinstance(r.get(key), (int, float)) and not r.get("nonfinite"))


def test_the_run_draws_one_point_per_logged_row(run_dir, tmp_path):
    assert {"loss.png", "eval_loss.png", "lr.png", "grad_norm.png", "memory.png"} <= {
        p.name for p in (run_dir / "plots").glob("*.png")
    }  # drawn by the run itself (--log.plots true)
    said: list[str] = []
    counts = plots.draw([run_dir], tmp_path / "out", say=said.append)
    rows = read_metrics(run_dir)
    train = rows_with(rows, "loss")
    assert train > 1 and said == []
    assert counts["loss.png"]["loss (raw)"] == train
    assert counts["loss.png"]["loss (EMA 0.6)"] == train
    assert counts["loss_tokens.png"]["loss (raw)"] == rows_with(rows, "tokens")
    assert counts["eval_loss.png"]["eval_loss"] == rows_with(rows, "eval_loss") > 0
    assert counts["exact_match.png"]["eval_exact_match"] == rows_with(rows, "eval_exact_match")
    assert counts["lr.png"]["lr"] == rows_with(rows, "lr")
    assert counts["grad_norm.png"]["grad_norm (before clipping)"] == rows_with(rows, "grad_norm")
    clip = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_grad_norm"]
    assert counts["grad_norm.png"][f"max_grad_norm {clip:g}"] == 2  # a horizontal line
    assert counts["tokens_per_sec.png"]["tokens_per_sec"] == rows_with(rows, "tokens_per_sec")
    assert counts["memory.png"]["rank 0"] == sum(1 for r in rows if "peak_memory_mib_per_rank" in r)
    assert "mfu.png" not in counts  # MFU is null on a CPU: no curve, and nothing said about it
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(counts)


def test_the_smoothing_is_tensorboards_debiased_ema():
    assert plots.ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0
    w = plots.EMA_WEIGHT
    second = ((1 - w) * w * 1.0 + (1 - w) * 3.0) / (1 - w**2)
    assert plots.ema([1.0, 3.0]) == pytest.approx([1.0, second])


def test_a_killed_run_draws_what_it_can_and_says_what_it_skipped(run_dir, tmp_path):
    killed = copy_run(run_dir, tmp_path / "killed")
    lines = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if "eval_loss" not in line]
    (killed / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    said: list[str] = []
    counts = plots.draw([killed], say=said.append)
    assert counts["loss.png"]["loss (raw)"] == len(lines) - 1  # the torn row is not drawn
    assert "eval_loss.png" not in counts and not (killed / "plots" / "eval_loss.png").exists()
    assert f"dtrain: plot: no eval rows in {killed}; eval_loss.png skipped" in said
    assert any("1 unreadable line" in line for line in said)
    assert len(said) == 2, said

    bare = tmp_path / "bare"  # killed before its first row: no metrics.jsonl at all
    copy_run(run_dir, bare)
    (bare / "metrics.jsonl").unlink()
    said.clear()
    assert plots.draw([bare], say=said.append) == {}
    assert said == [f"dtrain: plot: no metrics.jsonl in {bare}; nothing to draw from it"]


def test_dtrain_plot_writes_pngs_and_the_summary(run_dir, tmp_path):
    copy = copy_run(run_dir, tmp_path / "copy")
    proc = run_dtrain("plot", str(copy))
    assert_ok(proc)
    assert (copy / "plots" / "loss.png").stat().st_size > 0 and (copy / "summary.md").is_file()
    assert f"PNG(s) in {copy / 'plots'}" in proc.stdout
    with pytest.raises(UserError, match="RUN_DIR .* is not a dtrain run directory") as refused:
        plots.plot_main([str(copy), str(tmp_path / "nowhere")])
    assert "\n" not in str(refused.value)


def test_several_runs_overlay_one_curve_each(run_dir, tmp_path):
    other = copy_run(run_dir, tmp_path / "other")
    kept = [line for line in (other / "metrics.jsonl").read_text().splitlines() if '"step": 1,' not in line]
    (other / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    counts = plots.draw([run_dir, other], tmp_path / "cmp", say=lambda _line: None)
    loss = counts["loss.png"]
    assert loss[f"{run_dir.name} loss (raw)"] == rows_with(read_metrics(run_dir), "loss")
    assert (
        loss["other loss (raw)"]
        == rows_with(read_metrics(other), "loss")
        == loss[f"{run_dir.name} loss (raw)"] - 1
    )
    assert {k for k in counts["eval_loss.png"]} == {f"{run_dir.name} eval_loss", "other eval_loss"}
    assert not (run_dir / "plots" / "cmp").exists() and (tmp_path / "cmp" / "loss.png").is_file()


def test_faults_resumes_sources_and_the_clip_threshold_are_drawn(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "faulty")
    rows = read_metrics(run)
    train = [r for r in rows if "loss" in r]
    train[2]["empty_steps"] = 1
    fault = {"step": train[3]["step"], "nonfinite": True, "nonfinite_steps": 1, "action": "skip"}
    rollback = {"step": train[4]["step"], "nonfinite": True, "nonfinite_steps": 2, "action": "rollback"}
    evals = [r for r in rows if "eval_loss" in r]
    for r in evals:  # as with two data sources
        r["eval_loss/web"] = r["eval_loss"] + 0.5
    with open(run / "metrics.jsonl", "w") as fh:
        for r in [*rows, fault, rollback]:
            fh.write(json.dumps(r) + "\n")
    info = json.loads((run / "run_info.json").read_text())
    info["resumes"] = [{"resumed_from": {"checkpoint": "x", "step": 3}}]
    (run / "run_info.json").write_text(json.dumps(info))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["max_grad_norm"] = 0.0  # clipping off: no threshold line
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    counts = plots.draw([run], say=lambda _line: None)
    loss = counts["loss.png"]
    assert loss["empty steps"] == 1 and loss["nonfinite steps"] == 1 and loss["resumes"] == 1
    assert loss["rollbacks"] == 1
    assert counts["eval_loss.png"]["eval_loss/web"] == counts["eval_loss.png"]["eval_loss"] == len(evals)
    assert loss["loss (raw)"] == len(train)  # the fault row is not a loss point
    assert not any(k.startswith("max_grad_norm") for k in counts["grad_norm.png"])
    assert plots.events(plots.read_run(run))["resume"] == [3]


# --------------------------------------------------------------------------------------------
# dtrain plot-lr
# --------------------------------------------------------------------------------------------

SMOKE = str(REPO / "dtrain" / "recipes" / "smoke.yaml")


def test_plot_lr_draws_the_wsd_schedule_with_its_phases(tmp_path):
    flags = ["--config", SMOKE, "--optim.scheduler", "wsd", "--train.max_steps", "40"]
    cfg = parse_config(flags)
    curve = plots.lr_curve(cfg.optim, 40)
    counts = plots.draw_lr(curve, "wsd", tmp_path / "wsd.png")
    assert counts["lr"] == cfg.train.max_steps == len(curve.lrs)
    assert max(curve.lrs) == pytest.approx(cfg.optim.lr)
    assert {"warmup", "stable", "decay"} <= set(counts)
    assert curve.warmup + curve.stable + curve.decay == 40  # the phases tile the run
    assert curve.lrs[curve.warmup + curve.stable - 1] == pytest.approx(cfg.optim.lr)  # last stable step
    assert curve.lrs[-1] < cfg.optim.lr

    out = tmp_path / "cli.png"
    assert plots.plot_lr_main([*flags, "--out", str(out)]) == 0 and out.stat().st_size > 0


def test_plot_lr_marks_restarts_and_needs_steps_for_epochs(tmp_path):
    cfg = parse_config(
        ["--config", SMOKE, "--optim.scheduler", "cosine_with_restarts", "--train.max_steps", "60"]
    )
    curve = plots.lr_curve(cfg.optim, 60)
    counts = plots.draw_lr(curve, cfg.optim.scheduler, tmp_path / "r.png")
    assert len(curve.restarts) == cfg.optim.num_cycles - 1 and "restart" in counts
    assert "stable" not in counts
    epochs = ["--config", SMOKE, "--train.max_steps", "null", "--train.num_epochs", "1"]
    with pytest.raises(UserError, match="--steps is required"):
        plots.plot_lr_main([*epochs, "--out", str(tmp_path / "e.png")])
    args, rest = plots.split_plot_lr_args([*epochs, "--steps=12", "--out", "x.png"])
    assert (args.steps, args.out, rest) == (12, "x.png", epochs)
    args, rest = plots.split_plot_lr_args(["--steps", "12", "--", *epochs])  # as `dtrain launch` takes them
    assert (args.steps, rest) == (12, epochs)


# --------------------------------------------------------------------------------------------
# Without matplotlib, and when drawing fails
# --------------------------------------------------------------------------------------------


def test_dtrain_plot_without_matplotlib_is_one_line(run_dir):
    code = (  # as `dtrain plot` runs it (cli.guarded prints a UserError as one line, exit 2), without torch
        "import sys; sys.modules['matplotlib'] = None\n"
        "from dtrain.config import UserError\nfrom dtrain.plots import plot_main\n"
        f"try:\n    plot_main([{str(run_dir)!r}])\n"
        "except UserError as exc:\n    print(f'dtrain: error: {exc}', file=sys.stderr)\n    sys.exit(2)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env_for_subprocess()
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"dtrain: error: {plots.PLOTS_OFF}"]
    assert "pip install 'dtrain[plot]'" in proc.stderr


def test_a_run_without_matplotlib_says_once_that_plots_are_off(run_dir, tmp_path, monkeypatch):
    from dtrain.summary import at_end

    run = copy_run(run_dir, tmp_path / "nompl")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(plots, "_said_off", False)
    said: list[str] = []
    plots.at_eval(run, said.append)
    plots.at_eval(run, said.append)
    at_end(run, True, said.append)
    assert said == [f"dtrain: {plots.PLOTS_OFF}"]
    assert (run / "summary.md").is_file() and not (run / "plots").exists()


def test_a_failure_while_drawing_is_one_warning(run_dir, tmp_path, monkeypatch):
    from dtrain.summary import at_end

    run = copy_run(run_dir, tmp_path / "broken")

    def broken(*_args, **_kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(plots, "draw", broken)
    said: list[str] = []
    at_end(run, True, said.append)
    assert said == ["dtrain: warning: plots not drawn (RuntimeError: disk on fire second line)"]
    assert (run / "summary.md").is_file()

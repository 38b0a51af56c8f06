"""dtrain/summary.py: summary.md, written at the end of a run (and by `dtrain plot`), read from the run
directory's files only, so a finished, stopped or killed run all get one. Shares tests/test_plots.py's
real run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import read_metrics
from test_plots import copy_run, shared_run

from dtrain import plots
from dtrain.summary import render, write_summary


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return shared_run(tmp_path_factory)


def image_links(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def test_the_run_wrote_a_summary_naming_what_how_and_how_it_ended(run_dir):
    text = (run_dir / "summary.md").read_text()  # written by the run's end-of-run hook
    info = json.loads((run_dir / "run_info.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert "embedded tiny Llama" in text and f"{config['model']['num_layers']} layers" in text
    assert f"parameters: {info['model_parameters']:,}" in text
    assert f"**{info['ended']['reason']}** at step {info['ended']['step']}" in text
    assert f"schedule: {config['optim']['scheduler']}" in text and f"lr {config['optim']['lr']}" in text
    assert f"`metrics.jsonl`: {len(read_metrics(run_dir))} rows" in text
    links = image_links(text)
    pngs = sorted((run_dir / "plots").glob("*.png"))
    assert len(links) == len(pngs) > 0 and "plots/loss.png" in links
    assert all((run_dir / link).is_file() for link in links)  # relative to the run directory
    best = min(r["eval_loss"] for r in read_metrics(run_dir) if "eval_loss" in r)
    assert f"best {best:.4g}" in text


def test_a_killed_run_gets_a_summary_of_what_is_there(run_dir, tmp_path):
    killed = copy_run(run_dir, tmp_path / "killed")
    info = json.loads((killed / "run_info.json").read_text())
    del info["ended"]  # killed: no end record
    (killed / "run_info.json").write_text(json.dumps(info))
    lines = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if "eval_loss" not in line]
    (killed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    plots.draw([killed], say=lambda _line: None)
    text = write_summary(killed).read_text()
    last = json.loads(lines[-1])["step"]
    assert f"no end record: the run was killed or is still running (last logged step {last})" in text
    assert "no eval rows" in text and "final model: none" in text and "checkpoints: none" in text
    links = image_links(text)
    assert links and "plots/eval_loss.png" not in links and all((killed / link).is_file() for link in links)


def test_a_stopped_run_names_the_signal_and_its_own_model(run_dir, tmp_path):
    stopped = copy_run(run_dir, tmp_path / "stopped")
    info = json.loads((stopped / "run_info.json").read_text())
    info["resumes"] = [
        {
            "started": info["started"],
            "resumed_from": {"checkpoint": "x", "step": 3},
            "ended": {"reason": "stop_request", "step": 5, "at": info["ended"]["at"], "signal": "SIGUSR1"},
        }
    ]
    (stopped / "run_info.json").write_text(json.dumps(info))
    config = yaml.safe_load((stopped / "config.yaml").read_text())
    config["model"]["name_or_path"] = "my-org/my-model"
    (stopped / "config.yaml").write_text(yaml.safe_dump(config))
    text = render(plots.read_run(stopped), tmp_path / "no-plots")
    assert "**stop_request** at step 5, signal SIGUSR1" in text
    assert "`my-org/my-model`" in text and "embedded tiny Llama" not in text
    assert "resumes: 1 (from step 3)" in text
    assert "## Plots" not in text  # no PNGs, no image links

"""dtrain.rundir: where a run starts. Pure file-system logic, tested on real directories in-process."""

from __future__ import annotations

import pytest

from dtrain.checkpoint import MARKER, CheckpointError, write_json_atomic
from dtrain.rundir import has_earlier_run, prepare_output_dir, resolve_resume


def _checkpoint(run, step: int, complete: bool = True):
    path = run / "checkpoints" / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "weights.bin").write_bytes(b"x" * 8)
    if complete:
        write_json_atomic(path / MARKER, {"step": step, "files": [{"path": "weights.bin", "bytes": 8}]})
    return path


def test_resume_given_a_run_directory_takes_its_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, 4)
    newest = _checkpoint(run, 8)
    _checkpoint(run, 12, complete=False)
    plan = resolve_resume(tmp_path / "other", str(run), overwrite=False, config_yaml="")
    assert plan.path == newest


def test_resume_given_a_run_directory_without_checkpoint_says_how_to_continue_it(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("a: 1\n")
    with pytest.raises(CheckpointError) as err:
        resolve_resume(tmp_path / "other", str(run), overwrite=False, config_yaml="")
    message = str(err.value)
    assert "--checkpoint.resume" in message and "no complete checkpoint" in message
    assert f"--output_dir {run} --checkpoint.resume auto" in message


def test_resume_given_a_plain_directory_is_not_a_checkpoint(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="not a complete dtrain checkpoint"):
        resolve_resume(tmp_path / "o", str(tmp_path / "d"), overwrite=False, config_yaml="")


def test_resolving_changes_nothing_and_preparing_sets_aside_what_is_corrupt(tmp_path):
    run = tmp_path / "run"
    good = _checkpoint(run, 4)
    bad = _checkpoint(run, 8)
    (bad / "weights.bin").write_bytes(b"x")  # shorter than its marker says
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    plan = resolve_resume(run, "auto", overwrite=False, config_yaml="")
    assert plan.path == good and [p for p, _ in plan.corrupt] == [bad]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # reading only
    prepare_output_dir(run, overwrite=False, plan=plan)
    assert not bad.exists() and (run / "checkpoints" / f"corrupt-{bad.name}" / "weights.bin").is_file()


def test_an_empty_directory_holds_no_earlier_run(tmp_path):
    assert not has_earlier_run(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    assert not has_earlier_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert has_earlier_run(tmp_path)

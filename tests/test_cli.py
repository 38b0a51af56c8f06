"""The `dtrain` console script."""

from __future__ import annotations

from conftest import run_dtrain

from dtrain import __version__


def test_version_and_help():
    assert run_dtrain("--version").stdout.strip() == f"dtrain {__version__}"
    help_ = run_dtrain("--help")
    assert help_.returncode == 0 and "train" in help_.stdout


def test_train_subcommand_is_the_training_script(tmp_path):
    proc = run_dtrain("train", "--output_dir", str(tmp_path / "o"), "--train.max_steps", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dtrain: error: invalid config: --train.max_steps must be > 0 (got 0)"
    ]


def test_print_config_through_the_cli():
    proc = run_dtrain("train", "--print_config", "--train.max_steps", "77")
    assert proc.returncode == 0
    assert "max_steps: 77" in proc.stdout


def test_unknown_command():
    proc = run_dtrain("fly")
    assert proc.returncode == 2 and "unknown command 'fly'" in proc.stderr

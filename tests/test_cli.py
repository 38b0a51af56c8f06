"""The `dtrain` console script."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, env_for_subprocess

from dtrain import __version__


def _dtrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dtrain.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env_for_subprocess(),
    )


def test_version_and_help():
    assert _dtrain("--version").stdout.strip() == f"dtrain {__version__}"
    help_ = _dtrain("--help")
    assert help_.returncode == 0 and "train" in help_.stdout


def test_train_subcommand_is_the_training_script(tmp_path):
    proc = _dtrain("train", "--output_dir", str(tmp_path / "o"), "--train.max_steps", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dtrain: error: invalid config: --train.max_steps must be > 0 (got 0)"
    ]


def test_print_config_through_the_cli():
    proc = _dtrain("train", "--print_config", "--train.max_steps", "77")
    assert proc.returncode == 0
    assert "max_steps: 77" in proc.stdout


def test_unknown_command():
    proc = _dtrain("fly")
    assert proc.returncode == 2 and "unknown command 'fly'" in proc.stderr

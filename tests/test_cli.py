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


def test_a_bad_subcommand_argument_is_one_line():
    """argparse's own errors (a bad type, a bad choice, a missing argument) as every dtrain error: one line
    naming the argument, exit 2, the usage left to --help."""
    cases = {
        (
            "launch",
            "hsdp",
            "--replicas",
            "abc",
        ): "dtrain launch: error: argument --replicas: invalid int value: 'abc'",
        ("slurm", "ddp", "--nodes", "x"): "dtrain slurm: error: argument --nodes: invalid int value: 'x'",
        ("plan", "--gpus", "q"): "dtrain plan: error: argument --gpus: invalid int value: 'q'",
        (
            "export",
            "a",
            "b",
            "--dtype",
            "int3",
        ): "dtrain export: error: argument --dtype: invalid choice: 'int3'",
        ("plot",): "dtrain plot: error: the following arguments are required: RUN_DIR",
    }
    for argv, start in cases.items():
        proc = run_dtrain(*argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (argv, proc.stderr)
        assert lines[0].startswith(start) and lines[0].endswith(f"; see dtrain {argv[0]} --help"), lines

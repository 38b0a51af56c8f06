"""`dtrain slurm --dry-run`: the sbatch command it prints for a few option sets (no Slurm needed)."""

from __future__ import annotations

import shlex
import sys

from conftest import REPO, run_dtrain


def _printed(*args: str) -> tuple[dict[str, str], list[str]]:
    proc = run_dtrain("slurm", *args)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("dtrain slurm: "))
    words = shlex.split(line.removeprefix("dtrain slurm: "))
    env = dict(w.split("=", 1) for w in words[: words.index("sbatch")])
    return env, words[words.index("sbatch") :]


def test_multi_node_gpu_job():
    env, cmd = _printed(
        "fsdp",
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "--time",
        "24:00:00",
        "--partition",
        "gpu",
        "--account",
        "proj",
        "--dry-run",
        "--",
        "--train.max_steps",
        "1000",
        "--optim.lr",
        "1e-4",
    )
    assert cmd == [
        "sbatch",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--job-name=dtrain-fsdp",
        "--gres=gpu:8",
        "--time=24:00:00",
        "--partition=gpu",
        "--account=proj",
        str(REPO / "launch" / "slurm" / "multi_node.sbatch"),
    ]
    assert env == {
        "PROFILE": "fsdp",
        "PYTHON": sys.executable,
        "TRAIN_ARGS": "--train.max_steps 1000 --optim.lr 1e-4",
        "GPUS_PER_NODE": "8",
    }


def test_single_node_with_recipe_output_dir_and_restarts(tmp_path):
    recipe = REPO / "dtrain" / "recipes" / "smoke.yaml"
    env, cmd = _printed(
        "zero3", "--recipe", str(recipe), "--output-dir", "runs/x", "--max-restarts", "5", "--dry-run"
    )
    assert cmd[-1].endswith("single_node.sbatch") and "--nodes=1" in cmd
    assert not any(c.startswith("--gres") for c in cmd)  # no GPUs asked: the node's CPUs (CPU rehearsal)
    assert env == {
        "PROFILE": "zero3",
        "PYTHON": sys.executable,
        "RECIPE": str(recipe),
        "OUTPUT_DIR": "runs/x",
        "MAX_RESTARTS": "5",
    }


def test_bad_flags_are_refused_before_submitting():
    proc = run_dtrain("slurm", "ddp", "--dry-run", "--", "--train.max_stepz", "5")
    assert proc.returncode == 2 and "did you mean 'train.max_steps'" in proc.stderr
    proc = run_dtrain("slurm", "nosuchprofile", "--dry-run")
    assert proc.returncode == 2 and "unknown profile" in proc.stderr

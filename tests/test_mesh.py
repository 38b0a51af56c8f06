"""The hsdp profile (dtrain/mesh.py): FSDP2 over a dp_replicate x dp_shard mesh. A 2 x 2 mesh on 4 real gloo
ranks trains like one process; its parameters are sharded in 2 and replicated in 2 (the DTensor placements
the ranks recorded); the mesh is in run_info.json, the start-up line and the checkpoint marker; a launch
that drops the mesh is refused; `--replicas` is checked before anything starts. Its checkpoints moving to
fsdp and back: tests/test_resharding.py. On the test Slurm cluster: tests/test_slurm.py."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, TINY, accelerate_with_profile, run_dtrain, train_rows
from safetensors.torch import load_file

from dtrain.config import UserError
from dtrain.mesh import Mesh, requested

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(profile_runs):
    return profile_runs("hsdp"), profile_runs("one")[0]


def test_a_2x2_mesh_trains_like_one_process(runs):
    (out, proc), one = runs
    got, want = ({r["step"]: r["loss"] for r in train_rows(d)} for d in (out, one))
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    worst = max(abs(got[s] - want[s]) / want[s] for s in want)
    a, b = load_file(out / "final" / "model.safetensors"), load_file(one / "final" / "model.safetensors")
    worst_w = max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)
    print(f"\nhsdp 2x2 vs one process: losses {worst:.2e}, weights {worst_w:.2e} (relative)")
    assert worst <= 1e-5 and worst_w <= 1e-5, (worst, worst_w)


def test_parameters_are_sharded_in_two_and_replicated_in_two(runs):
    (out, proc), _ = runs
    dist = json.loads((out / "run_info.json").read_text())["distributed"]
    assert dist["num_processes"] == 4
    assert dist["mesh"]["dims"] == {"dp_replicate": 2, "dp_shard": 2}
    # every parameter: replicated along dp_replicate, its dim 0 split along dp_shard
    total = int(dist["sharded_parameters"].split("/")[1])
    assert dist["mesh"]["placements"] == {"Replicate(), Shard(dim=0)": total}, dist["mesh"]
    assert "hsdp 2x2 x 4 on cpu" in proc.stdout  # the start-up line
    marker = json.loads((out / "checkpoints" / "step-00000006" / "dtrain_checkpoint.json").read_text())
    assert marker["profile"] == "hsdp" and marker["mesh"] == {"dp_replicate": 2, "dp_shard": 2}
    assert "--parallelism_config_dp_replicate_size 2 --parallelism_config_dp_shard_size 2" in proc.stdout


def test_a_launch_that_drops_the_mesh_is_refused(tmp_path):
    """`--multi_gpu` on the accelerate launch command line: the launcher drops the YAML's parallelism_config
    and starts plain DDP. Every rank refuses, in one line, before training."""
    out = tmp_path / "run"
    launcher = ["--multi_gpu", "--num_processes", "2"]
    proc = accelerate_with_profile(
        "hsdp", launcher, [*TINY, "--output_dir", str(out)], ACCELERATE_USE_CPU="1"
    )
    assert proc.returncode != 0
    assert proc.stderr.count("dtrain: error: the launch asked for the hsdp mesh") == 1, proc.stderr[-3000:]
    assert "set up MULTI_CPU without it" in proc.stderr
    assert (
        f'File "{REPO / "dtrain"}' not in proc.stderr
    )  # no traceback from the ranks (accelerate prints its own)
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["hsdp", "--cpu", "--gpus", "4", "--replicas", "3"],
            "--replicas 3 must divide the job's 4 processes",
        ),
        (
            ["hsdp", "--cpu", "--gpus", "1", "--nodes", "2", "--main-address", "h:1", "--replicas", "4"],
            "of 1, 2",
        ),
        (["fsdp", "--cpu", "--gpus", "4", "--replicas", "2"], "--replicas is for the hsdp profile, not fsdp"),
    ],
)
def test_replicas_are_checked_before_launch(argv, error):
    proc = run_dtrain("launch", *argv, "--dry-run", "--", *TINY)
    assert proc.returncode == 2 and error in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_one_replica_per_node_by_default():
    proc = run_dtrain(
        "launch",
        "hsdp",
        "--cpu",
        "--gpus",
        "8",
        "--nodes",
        "4",
        "--main-address",
        "h:1",
        "--dry-run",
        "--",
        *TINY,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--parallelism_config_dp_replicate_size 4 --parallelism_config_dp_shard_size 8" in proc.stdout
    assert "DTRAIN_MESH=dp_replicate=4,dp_shard=8" in proc.stdout


@pytest.mark.parametrize(
    ("env", "mesh"),
    [
        # plain `accelerate launch --config_file hsdp.yaml` on 4 nodes x 8: the YAML's auto sizes
        ({"WORLD_SIZE": "32", "LOCAL_WORLD_SIZE": "8"}, Mesh(4, 8)),
        ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, Mesh(1, 4)),  # one node: a 1 x 4 mesh, as fsdp
        # dtrain launch hsdp --replicas 2 on one node of 4: the launcher's numbers win
        (
            {
                "WORLD_SIZE": "4",
                "LOCAL_WORLD_SIZE": "4",
                "PARALLELISM_CONFIG_DP_REPLICATE_SIZE": "2",
                "PARALLELISM_CONFIG_DP_SHARD_SIZE": "2",
            },
            Mesh(2, 2),
        ),
    ],
)
def test_auto_sizes_come_from_the_nodes(env, mesh):
    env = {
        "ACCELERATE_USE_PARALLELISM_CONFIG": "true",
        "PARALLELISM_CONFIG_DP_REPLICATE_SIZE": "auto",
        "PARALLELISM_CONFIG_DP_SHARD_SIZE": "auto",
        **env,
    }
    assert requested(env) == mesh
    # written back as numbers, where Accelerate's ParallelismConfig reads them
    assert (env["PARALLELISM_CONFIG_DP_REPLICATE_SIZE"], env["PARALLELISM_CONFIG_DP_SHARD_SIZE"]) == (
        str(mesh.replicate),
        str(mesh.shard),
    )


def test_a_mesh_that_is_not_the_job_is_one_line():
    env = {
        "ACCELERATE_USE_PARALLELISM_CONFIG": "true",
        "WORLD_SIZE": "4",
        "PARALLELISM_CONFIG_DP_REPLICATE_SIZE": "3",
        "PARALLELISM_CONFIG_DP_SHARD_SIZE": "2",
    }
    with pytest.raises(UserError, match="has 6 ranks but the job has 4"):
        requested(env)
    assert requested({"WORLD_SIZE": "4"}) is None  # no parallelism_config: no mesh

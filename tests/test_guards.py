"""Non-finite steps (`--train.nonfinite skip|halt|rollback`), agreed by every rank.

The fault is real, not mocked: a user's pretrained Llama directory (untied head) whose embedding row for
the character `~` is NaN, and text data where exactly one training example has a `~` in its response.
That example's forward is NaN on the one rank that reads it; every other example never touches the row.
The reference run replaces the whole faulty window by null rows, which train nothing and which dtrain
steps over without an update (`empty_steps`): "the run without that example's window".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    LONG_DDP,
    TINY,
    assert_ok,
    dtrain_launch,
    read_metrics,
    run_train,
    tiny_config,
    train_rows,
)
from safetensors.torch import load_file

from dtrain.background_save import DELAY_ENV
from dtrain.checkpoint import TMP_PREFIX, complete_checkpoints
from dtrain.data import DataOrder
from dtrain.guards import NONFINITE_EXIT_CODE

SEED, N, BATCH, STEPS, FAULT_STEP = 42, 64, 4, 5, 3


def write_tiny_llama(path: Path, edit) -> Path:
    """A tiny Llama directory with the character tokenizer, `edit(model, tokenizer)` applied to its weights
    before it is saved (also the GPU suite's models, tests/gpu/common.py)."""
    from transformers import AutoModelForCausalLM

    from dtrain.tasks import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", tok))
    with torch.no_grad():
        edit(model, tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def nan_row(model, tok) -> None:
    """The fault: the embedding row of `~` is NaN, so only an example with a `~` reaches it."""
    model.get_input_embeddings().weight[tok.convert_tokens_to_ids("~")] = float("nan")


@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("nan_row_llama"), nan_row)


def example(i: int, poison: bool = False, no_target: bool = False) -> dict:
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    return {
        "text": None if no_target else f"{words[i % 5]} {i} {words[i % 5].upper()}" + (" ~" if poison else "")
    }


def window_positions(step: int, global_batch: int) -> range:
    return range((step - 1) * global_batch, step * global_batch)


def write_data(directory: Path, world: int, poison_rank: int, faults: tuple[int, ...] = (FAULT_STEP,)):
    """(poisoned, clean, eval, poisoned example index) files. In the poisoned data, the first example that
    rank `poison_rank` reads in each faulty window has a `~`; in the clean data, the faulty windows hold
    only examples without a target."""
    order, g = DataOrder(N, SEED), BATCH * world
    rows = [example(i) for i in range(N)]
    poisoned, clean, bad = list(rows), list(rows), []
    for step in faults:
        window = window_positions(step, g)
        bad.append(order.index(window.start + poison_rank * BATCH))  # this rank's slice of the micro-batch
        poisoned[bad[-1]] = example(bad[-1], poison=True)
        for p in window:
            clean[order.index(p)] = example(order.index(p), no_target=True)
    paths = []
    for name, data in (
        ("poisoned", poisoned),
        ("clean", clean),
        ("eval", [example(i) for i in range(100, 108)]),
    ):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        paths.append(path)
    return (*paths, bad)


def args(model: Path, data: Path, eval_data: Path, out: Path, *extra: str) -> list[str]:
    return [
        *TINY,
        "--model.name_or_path",
        str(model),
        "--data.path",
        str(data),
        "--data.eval_path",
        str(eval_data),
        "--data.template",
        "text",
        "--data.max_length",
        "32",
        "--train.seed",
        str(SEED),
        "--train.per_device_batch_size",
        str(BATCH),
        "--train.max_steps",
        str(STEPS),
        "--eval.steps",
        "0",
        "--eval.num_generate",
        "0",
        "--eval.num_samples",
        "0",
        "--optim.lr",
        "1e-2",
        "--optim.scheduler",
        "constant_with_warmup",
        "--optim.warmup_steps",
        "0",
        "--checkpoint.keep_last",
        "10",
        "--output_dir",
        str(out),
        *extra,
    ]


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds: model and optimizer state (DCP shards, or DeepSpeed's files)."""
    if (ckpt / "deepspeed").is_dir():
        out = {}
        for f in sorted((ckpt / "deepspeed" / "ds").glob("*.pt")):
            flatten_tensors(torch.load(f, weights_only=False, map_location="cpu"), f.name, out)
        return out
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(ckpt / "dcp"))
    meta = reader.read_metadata().state_dict_metadata
    wanted = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if isinstance(m, TensorStorageMetadata)
    }
    dcp.load(wanted, storage_reader=reader, no_dist=True)
    return wanted


def flatten_tensors(obj, prefix: str, out: dict) -> None:
    if torch.is_tensor(obj):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            flatten_tensors(v, f"{prefix}.{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flatten_tensors(v, f"{prefix}.{i}", out)


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k].nan_to_num(), b[k].nan_to_num()) for k in a)


def fault_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if r.get("nonfinite")]


@pytest.fixture(scope="module")
def single(poisoned_model, tmp_path_factory) -> dict:
    """One process: the poisoned run under skip (a checkpoint every step) and the clean run."""
    d = tmp_path_factory.mktemp("guards_single")
    poisoned, clean, evalset, bad = write_data(d, world=1, poison_rank=0)
    runs = {"data": (poisoned, clean, evalset), "bad": bad}
    for name, data, extra in (("skip", poisoned, ["--checkpoint.save_steps", "1"]), ("clean", clean, [])):
        proc = run_train(args(poisoned_model, data, evalset, d / name, *extra))
        assert_ok(proc)
        runs[name] = (d / name, proc)
    return runs


def test_a_skipped_step_changes_nothing_and_the_run_equals_the_run_without_that_window(single):
    out, proc = single["skip"]
    (fault,) = fault_rows(out)
    assert fault["step"] == FAULT_STEP and fault["samples_seen"] == (FAULT_STEP - 1) * BATCH
    assert single["bad"][0] in fault["examples"] and fault["action"] == "skip"
    assert f"non-finite loss or gradient norm at step {FAULT_STEP}" in proc.stdout
    rows = {r["step"]: r for r in train_rows(out)}
    assert rows[FAULT_STEP - 1].get("nonfinite_steps") is None and rows[STEPS]["nonfinite_steps"] == 1
    ckpts = {
        s: checkpoint_tensors(out / "checkpoints" / f"step-{s:08d}") for s in range(FAULT_STEP - 1, STEPS)
    }
    assert_bitwise_equal(ckpts[FAULT_STEP - 1], ckpts[FAULT_STEP])  # parameters and optimizer state
    assert differs(ckpts[FAULT_STEP], ckpts[FAULT_STEP + 1])  # training went on after it
    sched = [
        torch.load(out / "checkpoints" / f"step-{s:08d}" / "scheduler.pt")
        for s in (FAULT_STEP - 1, FAULT_STEP)
    ]
    assert sched[0]["last_epoch"] == sched[1]["last_epoch"]  # the schedule did not move
    clean_out, _ = single["clean"]
    assert_bitwise_equal(
        load_file(out / "final" / "model.safetensors"), load_file(clean_out / "final" / "model.safetensors")
    )
    clean_rows = {r["step"]: r for r in train_rows(clean_out)}
    assert [r["loss"] for r in rows.values()] == [r["loss"] for r in clean_rows.values()]
    assert rows[FAULT_STEP]["loss"] is None  # nothing was trained in that step


def test_rollback_reloads_the_newest_checkpoint_and_steps_over_the_window(single, poisoned_model):
    poisoned, _, evalset = single["data"]
    out = single["skip"][0].parent / "rollback"
    proc = run_train(
        args(
            poisoned_model,
            poisoned,
            evalset,
            out,
            "--train.nonfinite",
            "rollback",
            "--checkpoint.save_steps",
            "2",
        )
    )
    assert_ok(proc)
    assert "rolled back to step-00000002" in proc.stdout
    (fault,) = fault_rows(out)
    assert fault["action"] == "rollback" and fault["step"] == FAULT_STEP
    assert [r["step"] for r in train_rows(out)] == list(range(1, STEPS + 1))  # each step logged once
    state = json.loads((out / "checkpoints" / f"step-{STEPS:08d}" / "train_state.json").read_text())
    assert state["rollbacks"] == 1 and state["skip_windows"] == [(FAULT_STEP - 1) * BATCH]
    clean_out, _ = single["clean"]
    assert_bitwise_equal(
        load_file(out / "final" / "model.safetensors"), load_file(clean_out / "final" / "model.safetensors")
    )


def test_halt_stops_at_the_fault_and_leaves_the_newest_checkpoint(single, poisoned_model):
    poisoned, _, evalset = single["data"]
    out = single["skip"][0].parent / "halt"
    proc = run_train(
        args(
            poisoned_model,
            poisoned,
            evalset,
            out,
            "--train.nonfinite",
            "halt",
            "--checkpoint.save_steps",
            "2",
        )
    )
    assert proc.returncode == NONFINITE_EXIT_CODE, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    line = [ln for ln in proc.stdout.splitlines() if "halted" in ln]
    assert len(line) == 1 and f"step {FAULT_STEP}" in line[0] and "data position 8" in line[0]
    assert "step-00000002 is the resume point" in line[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert not (out / "final").exists()
    ended = json.loads((out / "run_info.json").read_text())["ended"]
    assert ended["reason"] == "nonfinite" and ended["step"] == FAULT_STEP - 1


@pytest.mark.parametrize(
    "mode,limit,message",
    [
        ("skip", "2", "halted after 2 non-finite steps in a row (--train.max_nonfinite_steps)"),
        ("rollback", "1", "halted after 1 rollbacks (--train.max_nonfinite_steps)"),
    ],
)
def test_a_run_halts_past_max_nonfinite_steps(poisoned_model, tmp_path, mode, limit, message):
    """Two faulty windows in a row. Rollback: the first fault (no checkpoint yet) counts as a rollback."""
    poisoned, _, evalset, _ = write_data(tmp_path, world=1, poison_rank=0, faults=(2, 3))
    proc = run_train(
        args(
            poisoned_model,
            poisoned,
            evalset,
            tmp_path / "run",
            "--train.nonfinite",
            mode,
            "--train.max_nonfinite_steps",
            limit,
        )
    )
    assert proc.returncode == NONFINITE_EXIT_CODE, proc.stderr[-2000:]
    assert message in proc.stdout
    assert [r["step"] for r in fault_rows(tmp_path / "run")] == [2, 3]


# --------------------------------------------------------------------------------------------
# Two CPU ranks (gloo): the example that faults is read by rank 1 only
# --------------------------------------------------------------------------------------------


def test_ddp_skip_and_rollback_equal_the_run_without_that_window(poisoned_model, tmp_path):
    poisoned, clean, evalset, bad = write_data(tmp_path, world=2, poison_rank=1)
    runs = {
        "poisoned": (poisoned, []),
        "clean": (clean, []),
        "rollback": (poisoned, ["--train.nonfinite", "rollback", "--checkpoint.save_steps", "2"]),
    }
    for name, (data, extra) in runs.items():
        assert_ok(dtrain_launch("ddp", args(poisoned_model, data, evalset, tmp_path / name, *extra)))
    for name in ("poisoned", "rollback"):
        (fault,) = fault_rows(tmp_path / name)
        assert fault["step"] == FAULT_STEP and bad[0] in fault["examples"]
        assert_bitwise_equal(
            load_file(tmp_path / name / "final" / "model.safetensors"),
            load_file(tmp_path / "clean" / "final" / "model.safetensors"),
        )


@pytest.mark.parametrize(
    "profile,precision,mode",
    [("fsdp", "no", "skip"), ("zero2", "bf16", "skip"), ("zero2", "bf16", "rollback")],
)
def test_sharded_fault_leaves_parameters_and_optimizer_state_bitwise_unchanged(
    poisoned_model, tmp_path, profile, precision, mode
):
    """FSDP2 and DeepSpeed ZeRO-2 in bf16, whose engine steps inside backward and checks the norm itself
    (skip: the engine must not have applied the step). Rollback reloads the engine's checkpoint in place."""
    poisoned, _, evalset, _ = write_data(tmp_path, world=2, poison_rank=1)
    out = tmp_path / "run"
    proc = dtrain_launch(
        profile,
        args(
            poisoned_model,
            poisoned,
            evalset,
            out,
            "--checkpoint.save_steps",
            "1",
            "--train.mixed_precision",
            precision,
            "--train.nonfinite",
            mode,
        ),
    )
    assert_ok(proc)
    assert [r["step"] for r in fault_rows(out)] == [FAULT_STEP]
    assert ("rolled back to step-00000002" in proc.stdout) == (mode == "rollback")
    ckpts = {
        s: checkpoint_tensors(out / "checkpoints" / f"step-{s:08d}") for s in range(FAULT_STEP - 1, STEPS)
    }
    assert_bitwise_equal(ckpts[FAULT_STEP - 1], ckpts[FAULT_STEP])
    assert differs(ckpts[FAULT_STEP], ckpts[FAULT_STEP + 1])
    assert train_rows(out)[-1]["nonfinite_steps"] == 1


def _verdict_on_rank(rank: int, port: int, results) -> None:
    """Rank 1 alone has a NaN loss; its gradient norm (as every rank's) is finite."""
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        ACCELERATE_USE_CPU="1",
    )
    from accelerate.utils import InitProcessGroupKwargs

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    acc = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    from dtrain.guards import NonfiniteGuard

    guard = NonfiniteGuard(acc)
    loss = torch.tensor(float("nan") if rank == 1 else 1.0)
    results[rank] = (
        guard.faulted(loss, torch.tensor(2.0), None),
        guard.faulted(torch.tensor(1.0), torch.tensor(2.0), None),
    )


def test_every_rank_gets_the_verdict_of_the_one_rank_that_saw_a_nan():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_verdict_on_rank, args=(port, results), nprocs=2, join=True)
        assert dict(results) == {0: (True, False), 1: (True, False)}


# --------------------------------------------------------------------------------------------
# No rank left hanging: a 2-rank CPU job whose rank 1 is killed (SIGKILL) or frozen (SIGSTOP)
# --------------------------------------------------------------------------------------------

KILL_ARGS = LONG_DDP  # a checkpoint every 10 steps; a lost peer is given up after 10 s


def start_and_hit_rank_1(
    out: Path, signum: int, after_step: int = 12, args=KILL_ARGS, ready=None, **env: str
):
    """Start the job, wait until it has logged `after_step` (a checkpoint exists) or until `ready(out)`, send
    `signum` to the process of rank 1. Returns (finished process, seconds from the signal to the job's end)."""
    import os
    import subprocess
    import time

    from conftest import REPO, env_for_subprocess, launch_cmd

    job = subprocess.Popen(
        launch_cmd("ddp", [*args, "--output_dir", str(out)]),
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env_for_subprocess(**env),
    )
    deadline = time.time() + 300

    def logged() -> bool:
        return (out / "metrics.jsonl").exists() and any(r["step"] >= after_step for r in train_rows(out))

    while not (ready(out) if ready else logged()):
        assert job.poll() is None and time.time() < deadline, "the job ended or stalled before the signal"
        time.sleep(0.02)
    (rank1,) = [pid for pid in _pids_of(out) if "RANK=1" in _environ(pid)]
    os.kill(rank1, signum)
    hit = time.time()
    stdout, stderr = job.communicate(timeout=300)
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr), time.time() - hit


def _pids_of(out: Path) -> list[int]:
    """Processes whose command line names this run's output directory."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(out) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _environ(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")


ASYNC_KILL_ARGS = [*KILL_ARGS, "--checkpoint.async_save", "true"]


def _step20_written(out: Path) -> bool:
    """Both ranks' files of the step-20 background save are written; its writers hold (DELAY_ENV) before
    they agree and commit."""
    return len(list((out / "checkpoints" / f"{TMP_PREFIX}step-00000020" / "rng").glob("rank-*.pt"))) == 2


def test_a_killed_rank_ends_the_job_and_the_same_command_resumes_exactly(tmp_path, straight_long_ddp):
    """Rank 1 SIGKILLed while a background save (--checkpoint.async_save) is in flight: its files are written,
    not yet agreed on. The job ends; the same command resumes from the checkpoint before (step 10), the
    half-written one is not counted, and every loss is bitwise the uninterrupted (synchronous) run's."""
    import signal

    reference = straight_long_ddp
    out = tmp_path / "killed"
    proc, seconds = start_and_hit_rank_1(
        out, signal.SIGKILL, args=ASYNC_KILL_ARGS, ready=_step20_written, **{DELAY_ENV: "5"}
    )
    assert seconds < 10 + 30, f"the job took {seconds:.0f} s to end after rank 1 died"
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr[-3000:]
    assert "dtrain launch: rank 1 exited with code 137 (SIGKILL); the job was stopped" in proc.stderr
    assert "lost contact with another rank" in proc.stderr and "Traceback" not in proc.stderr
    assert _pids_of(out) == []  # no rank, launcher or agent left behind
    assert complete_checkpoints(out / "checkpoints")[-1].name == "step-00000010"  # step 20 never committed
    resumed = dtrain_launch("ddp", [*ASYNC_KILL_ARGS, "--output_dir", str(out)])  # the very same command
    assert_ok(resumed)
    assert "resuming from" in resumed.stdout and "step-00000010 at step 10" in resumed.stdout
    assert not list((out / "checkpoints").glob(f"{TMP_PREFIX}*"))  # the half-written one cleaned up
    straight = {r["step"]: r["loss"] for r in train_rows(reference)}
    again = {r["step"]: r["loss"] for r in train_rows(out)}
    assert again == straight  # every step once, each loss bitwise equal to the uninterrupted run's
    assert_bitwise_equal(
        load_file(out / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    )


def test_a_frozen_rank_ends_the_job_after_collective_timeout_s(tmp_path):
    """SIGSTOP: rank 1 is alive but answers nothing, as a rank stuck in a driver call. Nothing but the
    collective timeout (10 s) can end rank 0's wait. torchrun's agent then stops the frozen rank: SIGTERM,
    and SIGKILL 30 s later (after a worker failure torch uses its fixed 30 s, not PET_SHUTDOWN_TIMEOUT)."""
    import signal

    out = tmp_path / "frozen"
    proc, seconds = start_and_hit_rank_1(out, signal.SIGSTOP)
    assert 10 <= seconds < 10 + 30 + 20, f"the job took {seconds:.0f} s to end after rank 1 froze"
    assert proc.returncode == 69, proc.stderr[-3000:]
    assert "lost contact with another rank" in proc.stderr and "collective_timeout_s" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _pids_of(out) == []


def test_an_fp16_fault_leaves_the_grad_scaler_as_it_was():
    """Accelerate refuses fp16 on a CPU, so the guard gets a stand-in accelerator holding a real
    torch.amp.GradScaler (the one Accelerate uses on CUDA). Clipping unscales the gradients before the
    verdict; a dropped step must leave the scale alone and let the next step unscale again."""
    from types import SimpleNamespace

    from dtrain.guards import NonfiniteGuard

    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    acc = SimpleNamespace(
        mixed_precision="fp16",
        scaler=scaler,
        num_processes=1,
        distributed_type=SimpleNamespace(name="MULTI_CPU"),
    )
    guard = NonfiniteGuard(acc)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.ones(2, 4)).sum() * float("nan")).backward()
    scaler.unscale_(opt)  # what accelerator.clip_grad_norm_ does first
    assert guard.faulted(torch.tensor(float("nan")), torch.tensor(float("inf")), opt)
    guard.discard(opt)
    assert scaler.get_scale() == 1024.0 and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    scaler.scale(model(torch.ones(2, 4)).sum()).backward()
    scaler.unscale_(opt)  # would raise "unscale_() has already been called" without the reset
    # fp16: an overflowing gradient with a finite loss is the scaler's business, not a fault
    assert not guard.faulted(torch.tensor(1.0), torch.tensor(float("inf")), opt)
    scaler.step(opt)
    scaler.update()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

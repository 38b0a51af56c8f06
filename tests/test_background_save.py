"""Asynchronous checkpoints (dtrain/background_save.py, `--checkpoint.async_save true`), on real runs:

- one process, 2-rank ddp and 2-rank fsdp saving in the background: every loss, the final weights and every
  checkpoint's tensors, RNG states, schedule and train state bitwise those of the shared synchronous runs
  (conftest.profile_runs, the same flags otherwise);
- a disk that fills up during a background write on 2 ranks: the run ends with the one line a synchronous
  failure gives (exit 2, no traceback), the previous checkpoint intact and no temporary directory left;
- DeepSpeed refuses the flag, in `dtrain launch` before anything starts;
- hsdp (2 x 2) saving in the background on 2 Slurm nodes: tests/test_slurm.py;
- in one process, no launch: the host copy runs beside the next step, and the update after a save waits
  for it, so the copy is the save step's state even when the update follows at once.
Elsewhere: a rank SIGKILLed while a background write is in flight (tests/test_guards.py), a stop request
while one is in flight (tests/test_signals.py), the loop's host copies with async saves
(tests/test_host_sync.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    ONE_PROCESS,
    PROFILE_SHAPE,
    TINY,
    assert_ok,
    dtrain_launch,
    mount_tmpfs,
    run_dtrain,
    run_train,
    train_rows,
)
from safetensors.torch import load_file

from dtrain.background_save import BackgroundSave
from dtrain.checkpoint import MARKER, verify

pytestmark = pytest.mark.slow

ASYNC = ["--checkpoint.async_save", "true"]


@pytest.fixture(scope="module")
def async_runs(tmp_path_factory):
    made: dict[str, Path] = {}

    def run(where: str) -> Path:
        if where not in made:
            out = tmp_path_factory.mktemp(f"async-{where}") / "run"
            args = [*PROFILE_SHAPE, *ASYNC, "--output_dir", str(out)]
            proc = run_train([*args, *ONE_PROCESS]) if where == "one" else dtrain_launch(where, args)
            assert_ok(proc)
            made[where] = out
        return made[where]

    return run


def dcp_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, by name: the DCP shards gathered into one state dict, the RNG files,
    the schedule."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = ckpt.parent / f"{ckpt.name}.pt"
    dcp_to_torch_save(ckpt / "dcp", whole)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)
        else:
            flat[prefix] = torch.tensor(float(value)) if isinstance(value, (int, float)) else value

    walk("dcp", torch.load(whole, weights_only=False))
    whole.unlink()
    for rng in sorted((ckpt / "rng").glob("*.pt")):
        walk(f"rng/{rng.name}", torch.load(rng, weights_only=True))
    walk("scheduler", torch.load(ckpt / "scheduler.pt", weights_only=True))
    return flat


@pytest.mark.parametrize("where", ["one", "ddp", "fsdp"])
def test_background_saves_are_bitwise_the_synchronous_ones(where, async_runs, profile_runs):
    sync, _ = profile_runs(where)
    out = async_runs(where)
    assert {r["step"]: r["loss"] for r in train_rows(out)} == {r["step"]: r["loss"] for r in train_rows(sync)}
    a, b = load_file(out / "final" / "model.safetensors"), load_file(sync / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for step in ("step-00000003", "step-00000006"):
        got, want = out / "checkpoints" / step, sync / "checkpoints" / step
        assert verify(got) is None
        tg, tw = dcp_tensors(got), dcp_tensors(want)
        assert tg.keys() == tw.keys() and len(tg) > 10
        for k in tw:
            if isinstance(tw[k], torch.Tensor):
                assert torch.equal(tg[k], tw[k]), (step, k)
            else:
                assert tg[k] == tw[k], (step, k)
        # the marker describes the snapshot of its own step, not the state of a later one
        mg, mw = (json.loads((d / MARKER).read_text()) for d in (got, want))
        assert mg["train_state"] == mw["train_state"] and mg["step"] == int(step.split("-")[1])
        assert mg["eval"] == mw["eval"]
        assert json.loads((got / "train_state.json").read_text()) == mw["train_state"]


def test_a_disk_that_fills_during_a_background_write_is_the_synchronous_line(profile_runs, tmp_path):
    """Saves at 2, 4, 6 on 2 ranks into room for one checkpoint and a half: the step-4 write fails in the
    background while training goes on; the next wait (the step-6 save) raises it, on every rank alike."""
    sync, _ = profile_runs("ddp")
    size = sum(f.stat().st_size for f in (sync / "checkpoints" / "step-00000003").rglob("*") if f.is_file())
    run = tmp_path / "run"
    root = run / "checkpoints"
    if not mount_tmpfs(root, int(size * 1.5 / 1024)):
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN; this machine does not allow it")
    try:
        args = [*PROFILE_SHAPE, *ASYNC, "--checkpoint.save_steps", "2", "--output_dir", str(run)]
        proc = dtrain_launch("ddp", args)
        names = sorted(p.name for p in root.iterdir())
    finally:
        subprocess.run(["umount", str(root)], check=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]  # every rank raised it; one says so
    assert errors[0].startswith(
        f"dtrain: error: saving checkpoint {root / 'step-00000004'} failed: disk full"
    )
    assert "the previous checkpoint step-00000002 is intact" in errors[0]
    assert "Traceback" not in proc.stderr
    assert "dtrain launch: rank 0 exited with code 2" in proc.stderr or "exited with code 2" in proc.stderr
    assert names == ["step-00000002"], names  # no temporary directory, no step 4 or 6


def test_deepspeed_refuses_background_saves_before_launch():
    proc = run_dtrain("launch", "zero2", "--cpu", "--dry-run", "--", *TINY, *ASYNC)
    assert proc.returncode == 2
    assert "--checkpoint.async_save true is for the DCP profiles" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_update_after_a_save_waits_for_its_host_copy():
    """A 256 MiB parameter staged, then an SGD update at once (no forward in between to hide the copy):
    the staged tensor holds the save step's values, and the update waited for it. The accelerator stands
    in as the two fields BackgroundSave reads (device, process count): one process, no group."""
    weight = torch.nn.Parameter(torch.zeros(64 * 2**20))
    weight.grad = torch.full_like(weight, -1.0)
    optimizer = torch.optim.SGD([weight], lr=1.0)
    background = BackgroundSave(SimpleNamespace(device=torch.device("cpu"), num_processes=1), 60)
    background.hold_updates(optimizer)
    staging = background.stage({"weight": weight})
    optimizer.step()  # weight becomes 1.0 everywhere, once the copy is over
    staged = staging.result()["weight"]
    assert staged.data_ptr() != weight.data_ptr()
    assert torch.count_nonzero(staged) == 0  # not one element of the update reached the copy
    assert torch.all(weight == 1.0)
    assert background.staging is None and background.held_s >= 0

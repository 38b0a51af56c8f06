"""Check 1, precision on CUDA: the smoke recipe in bf16 and fp16 trains (finite, falling loss); fp16 runs
through the grad scaler, whose scale is saved with every checkpoint and whose overflows are skipped and
counted (`skipped_steps`), forced here by a model whose fp16 gradients overflow; bf16's losses are an fp32
GPU run's to bf16 rounding. The CPU suite cannot run fp16 at all (Accelerate refuses it on CPU) and proves
the scaler only with a stand-in accelerator (tests/test_guards.py)."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate.utils import GradScalerKwargs
from conftest import assert_ok, read_metrics, train_rows

from .common import (
    BF16_FIRST_STEP_RTOL,
    BF16_RTOL,
    checkpoint,
    finite_and_falling,
    losses,
    run_info,
    uses,
    worst_rel,
)

pytestmark = pytest.mark.gpu
SCALER = GradScalerKwargs()  # Accelerate's defaults, which dtrain keeps: init_scale 65536, backoff 0.5


def scaler_state(ckpt) -> dict:
    path = ckpt / "scaler.pt"
    assert path.is_file(), f"{ckpt.name} has no scaler.pt: no grad scaler ran"
    return torch.load(path, weights_only=True)


@uses("bf16", "fp16")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_bf16_and_fp16_train_the_smoke_recipe_with_a_finite_falling_loss(runs, figure, precision):
    """bf16 and fp16 runs of the smoke recipe on the GPU: finite, falling loss."""
    run = runs[precision]
    assert_ok(run.proc)
    info = run_info(run.out)["distributed"]
    assert info["mixed_precision"] == precision and info["device"].startswith("cuda"), info
    got = losses(run.out)
    assert [r["step"] for r in train_rows(run.out)] == list(range(1, 9))
    assert finite_and_falling(got), got
    figure("loss first", got[0])
    figure("loss last", got[-1])
    figure("run s", run.seconds)


@uses("fp16", "bf16")
def test_fp16_runs_through_the_grad_scaler_and_saves_its_scale(runs, figure):
    """fp16: the grad scaler is on, its scale is in every checkpoint, lowered once per counted skip."""
    fp16, bf16 = runs["fp16"], runs["bf16"]
    assert_ok(fp16.proc)
    rows = train_rows(fp16.out)
    assert all("skipped_steps" in r for r in rows), rows[0]  # logged under fp16 only
    assert not any("skipped_steps" in r for r in train_rows(bf16.out))
    skipped = rows[-1]["skipped_steps"]
    for step in (4, 8):
        state = scaler_state(checkpoint(fp16.out, step))
        skipped_then = next(r["skipped_steps"] for r in rows if r["step"] == step)
        # no growth within growth_interval (2000) steps: the scale moves only by a backoff per overflow
        assert state["scale"] == SCALER.init_scale * SCALER.backoff_factor**skipped_then, (step, state)
    assert not (checkpoint(bf16.out, 8) / "scaler.pt").exists()  # bf16 needs no scaler
    figure("scale", state["scale"])
    figure("skipped steps", skipped)


@uses("fp16_overflow")
def test_a_forced_fp16_overflow_is_skipped_counted_and_leaves_the_weights(runs, figure):
    """A forced fp16 overflow: the step is skipped (weights, optimizer and schedule unchanged), counted in
    `skipped_steps`, the scale halved; not a non-finite fault; training goes on once the scale fits."""
    from test_guards import assert_bitwise_equal, checkpoint_tensors, differs

    run = runs["fp16_overflow"]
    assert_ok(run.proc)
    assert not [r for r in read_metrics(run.out) if r.get("nonfinite")]  # the scaler's business, not a fault
    rows = {r["step"]: r for r in train_rows(run.out)}
    steps = max(rows)
    assert sorted(rows) == list(range(1, steps + 1))
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in rows.values())
    counts = [0] + [rows[s]["skipped_steps"] for s in range(1, steps + 1)]
    skipped_at = [s for s in range(1, steps + 1) if counts[s] == counts[s - 1] + 1]
    assert counts == sorted(counts) and len(skipped_at) == counts[-1]  # one at a time, never taken back
    assert 1 in skipped_at, "the hot-head model did not overflow at the initial scale"
    assert counts[-1] < steps, "every step overflowed: nothing trained"
    final = scaler_state(checkpoint(run.out, steps))
    assert final["scale"] == SCALER.init_scale * SCALER.backoff_factor ** counts[-1]
    sched = torch.load(checkpoint(run.out, steps) / "scheduler.pt", weights_only=False)
    assert sched["last_epoch"] == steps - counts[-1]  # the schedule moved only on applied steps
    for s in skipped_at:
        if s > 1:  # the checkpoint before a skipped step holds what the one after it holds
            assert_bitwise_equal(
                checkpoint_tensors(checkpoint(run.out, s - 1)), checkpoint_tensors(checkpoint(run.out, s))
            )
    applied = [s for s in range(2, steps + 1) if s not in skipped_at]
    assert applied, "no step was applied after the first"
    s = applied[0]
    assert differs(checkpoint_tensors(checkpoint(run.out, s - 1)), checkpoint_tensors(checkpoint(run.out, s)))
    figure("skipped steps", counts[-1])
    figure("final scale", final["scale"])


@uses("bf16", "fp32", "fp16")
def test_bf16_losses_are_an_fp32_gpu_run_s_to_bf16_rounding(runs, figure):
    """bf16 losses equal an fp32 GPU run's within bf16 rounding (fp16's difference is reported)."""
    fp32, bf16, fp16 = (runs[p] for p in ("fp32", "bf16", "fp16"))
    for run in (fp32, bf16):
        assert_ok(run.proc)
    ref, got = losses(fp32.out), losses(bf16.out)
    first = abs(got[0] - ref[0]) / ref[0]
    worst = worst_rel(got, ref)
    figure("bf16 step-1 rel diff", first)
    figure("bf16 worst rel diff", worst)
    if fp16.proc.returncode == 0:
        figure("fp16 worst rel diff", worst_rel(losses(fp16.out), ref))
    assert first <= BF16_FIRST_STEP_RTOL, (got, ref)  # the same weights: rounding only
    assert worst <= BF16_RTOL, (got, ref)
    assert got != ref  # really computed in bf16

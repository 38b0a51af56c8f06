"""Check 8, the non-finite guard on CUDA: tests/test_guards.py's fault (a NaN embedding row that one training
example reaches, at step 3) in a bf16 run on the GPU is found, skipped on the device's own verdict, and leaves
parameters and optimizer state bitwise as they were; training goes on. A lost rank is not rehearsed here:
one GPU holds one rank (the CPU suite kills and freezes ranks of 2)."""

from __future__ import annotations

import pytest
from conftest import assert_ok, train_rows
from test_guards import FAULT_STEP, STEPS, assert_bitwise_equal, checkpoint_tensors, differs, fault_rows

from .common import checkpoint, run_info, uses

pytestmark = pytest.mark.gpu


@uses("nan_guard")
def test_a_nan_step_on_cuda_is_skipped_with_parameters_unchanged(runs, figure):
    """A NaN loss at step 3 on the GPU (bf16): skipped, counted, weights and optimizer state unchanged."""
    run = runs["nan_guard"]
    assert_ok(run.proc)
    assert run_info(run.out)["distributed"]["device"].startswith("cuda")
    bad = runs.inputs["nan_data"][3]  # the poisoned example's index (test_guards.write_data)
    (fault,) = fault_rows(run.out)
    assert fault["step"] == FAULT_STEP and fault["action"] == "skip" and bad[0] in fault["examples"]
    assert f"non-finite loss or gradient norm at step {FAULT_STEP}" in run.proc.stdout
    rows = {r["step"]: r for r in train_rows(run.out)}
    assert rows[FAULT_STEP]["loss"] is None and rows[STEPS]["nonfinite_steps"] == 1
    ckpts = {s: checkpoint_tensors(checkpoint(run.out, s)) for s in range(FAULT_STEP - 1, STEPS)}
    assert_bitwise_equal(ckpts[FAULT_STEP - 1], ckpts[FAULT_STEP])  # parameters and optimizer state
    assert differs(ckpts[FAULT_STEP], ckpts[FAULT_STEP + 1])  # training went on after it
    figure("fault step", fault["step"])
    figure("tensors compared", len(ckpts[FAULT_STEP]))

"""Multi-process runs: 2 real CPU ranks over gloo launched by `accelerate launch` (slow: ~20 s each)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, assert_ok, run_accelerate, run_train, train_rows

pytestmark = pytest.mark.slow

SHAPE = [
    "--train.max_steps",
    "6",
    "--train.gradient_accumulation_steps",
    "2",
    "--checkpoint.save_steps",
    "3",
    "--eval.steps",
    "3",
]


def test_two_ranks_train_the_same_math_as_one(tmp_path):
    """Global batch 8 either way: 1 process x 4 examples x 2 micro-steps, or 2 ranks x 2 x 2.
    The loss is normalised by the global target-token count, so the two runs agree."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(run_train([*TINY, *SHAPE, "--output_dir", str(one), "--train.per_device_batch_size", "4"]))
    proc = run_accelerate(2, [*TINY, *SHAPE, "--output_dir", str(two), "--train.per_device_batch_size", "2"])
    assert_ok(proc)
    a, b = train_rows(one), train_rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5), (ra, rb)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
        assert ra["tokens"] == rb["tokens"]
    ea = [r for r in (one / "metrics.jsonl").read_text().splitlines() if "eval_loss" in r]
    eb = [r for r in (two / "metrics.jsonl").read_text().splitlines() if "eval_loss" in r]
    assert len(ea) == len(eb) == 2
    from safetensors.torch import load_file

    wa, wb = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-4, worst
    assert "MULTI_CPU" in (two / "run_info.json").read_text()
    assert "ddp x 2 on cpu" in proc.stdout  # the start-up line, as prose
    # the second rank prints nothing but errors: none of the library warnings it would repeat
    assert "[rank1]" not in proc.stderr, proc.stderr
    # peak memory is each rank's own (the row's headline is the largest), and a real process size
    assert all(len(r["peak_memory_mib_per_rank"]) == 2 for r in b)
    assert all(r["peak_memory_mib"] == max(r["peak_memory_mib_per_rank"]) > 100 for r in b)
    assert all(len(r["peak_memory_mib_per_rank"]) == 1 for r in a)


def test_multi_gpu_without_cpu_flag_is_refused(tmp_path):
    """`--multi_gpu` on a machine without GPUs and without ACCELERATE_USE_CPU starts processes that each
    think they are alone; the script must refuse instead of training the job twice."""
    out = tmp_path / "run"
    proc = run_accelerate(2, [*TINY, "--output_dir", str(out)], cpu=False)
    assert proc.returncode != 0
    assert "ACCELERATE_USE_CPU=1" in proc.stderr
    assert not (out / "metrics.jsonl").exists()


def test_two_rank_resume_is_exact(tmp_path):
    """A 2-rank DDP checkpoint continues on 2 ranks with the same losses as the straight run."""
    straight = tmp_path / "straight"
    proc = run_accelerate(
        2, [*TINY, *SHAPE, "--output_dir", str(straight), "--train.per_device_batch_size", "2"]
    )
    assert_ok(proc)
    import shutil

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    shutil.copytree(straight / "data", resumed / "data")
    proc = run_accelerate(
        2, [*TINY, *SHAPE, "--output_dir", str(resumed), "--train.per_device_batch_size", "2"]
    )
    assert_ok(proc)
    a = {r["step"]: r["loss"] for r in train_rows(straight)}
    b = {r["step"]: r["loss"] for r in train_rows(resumed)}
    assert sorted(b) == [4, 5, 6]
    assert all(a[s] == b[s] for s in b), (a, b)
    from safetensors.torch import load_file

    wa, wb = (
        load_file(straight / "final" / "model.safetensors"),
        load_file(resumed / "final" / "model.safetensors"),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

"""Check 6, `--train.compile true` on CUDA (Accelerate's regional compilation, inductor and Triton): the
decoder layers are compiled, the losses are eager's within bf16 rounding, and the compiled step time after
warm-up is reported beside eager's (a figure, not asserted: a 256-wide model is launch-bound). The two runs
go one after the other with nothing else running. The CPU suite (tests/test_train.py) compiles for CPU."""

from __future__ import annotations

import time

import pytest
from conftest import assert_ok, run_train

from .common import BF16_RTOL, SHORT, WIDE, losses, run_info, step_seconds, worst_rel

pytestmark = pytest.mark.gpu
WARMUP = 4  # the first steps compile (and recompile once for dynamic shapes): timed after them
ARGS = [
    *SHORT,
    *WIDE,
    *("--train.max_steps", "16", "--train.per_device_batch_size", "16", "--checkpoint.save_steps", "0"),
    *("--train.mixed_precision", "bf16"),
]


@pytest.fixture(scope="module")
def pair(runs, tmp_path_factory) -> dict:
    runs.drain()  # the GPU to these two alone: their step times are the figure
    root, done = tmp_path_factory.mktemp("compile"), {}
    for name, extra in (("eager", []), ("compiled", ["--train.compile", "true"])):
        start = time.perf_counter()
        proc = run_train([*ARGS, *extra, "--output_dir", str(root / name)])
        done[name] = (root / name, proc, time.perf_counter() - start)
    return done


def test_compiled_losses_equal_eager_and_the_step_time_is_reported(pair, figure):
    """Regional compile on CUDA: losses equal eager's within bf16 rounding; step times reported."""
    (eager, eager_proc, eager_s), (compiled, compiled_proc, compiled_s) = pair["eager"], pair["compiled"]
    assert_ok(eager_proc)
    assert_ok(compiled_proc)
    assert "LlamaDecoderLayer" in run_info(compiled)["compiled_modules"]
    assert run_info(eager)["compiled_modules"] == []
    worst = worst_rel(losses(compiled), losses(eager))
    eager_step, compiled_step = step_seconds(eager, WARMUP), step_seconds(compiled, WARMUP)
    figure("loss worst rel diff", worst)
    figure("eager ms/step", 1e3 * eager_step)
    figure("compiled ms/step", 1e3 * compiled_step)
    figure("speed-up", eager_step / compiled_step)
    figure("compile cost s", compiled_s - eager_s)
    assert worst <= BF16_RTOL, (losses(compiled), losses(eager))

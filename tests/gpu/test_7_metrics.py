"""Check 7, the metrics that exist only on CUDA: `mfu` (FLOPs per token x tokens/s over the device's dense
bf16 peak, dtrain/metrics.py) in every train row and between 0 and 1 on a device dtrain knows, and
`peak_memory_mib` from torch.cuda.max_memory_allocated rather than the process's resident set. On CPU
`mfu` is null and `peak_memory_mib` is the peak RSS (tests/test_metrics.py)."""

from __future__ import annotations

import statistics

import pytest
import torch
from conftest import assert_ok, train_rows

from dtrain.metrics import peak_flops, peak_memory_bytes

from .common import run_info, uses

pytestmark = pytest.mark.gpu


@uses("bf16")
def test_mfu_is_logged_and_between_0_and_1_on_a_known_device(runs, figure):
    """`mfu` in every train row of a bf16 run, 0 < mfu < 1, on a device of dtrain's peak-FLOP/s table."""
    device = torch.cuda.get_device_name(0)
    if peak_flops(torch.device("cuda", 0)) is None:
        pytest.skip(f"{device} is not in dtrain.metrics.PEAK_BF16_FLOPS: mfu is null there by design")
    run = runs["bf16"]
    assert_ok(run.proc)
    mfu = [r["mfu"] for r in train_rows(run.out)]
    assert all(m is not None and 0.0 < m < 1.0 for m in mfu), mfu
    figure("device", device)
    figure("mfu median", statistics.median(mfu))


@uses("bf16")
def test_peak_memory_is_the_cuda_allocator_s_peak(runs, figure):
    """`peak_memory_mib` of a bf16 run: at least the weights, gradients and optimizer state it must hold on
    the GPU, at most the GPU; and dtrain's reader is torch.cuda.max_memory_allocated."""
    run = runs["bf16"]
    assert_ok(run.proc)
    rows = train_rows(run.out)
    params = run_info(run.out)["model_parameters"]
    first = next(r for r in rows if "optim_state_bytes_per_param" in r)
    held_mib = params * (4 + 4 + first["optim_state_bytes_per_param"]) / 2**20  # fp32 weights, grads, state
    total_mib = torch.cuda.get_device_properties(0).total_memory / 2**20
    for r in rows:
        assert r["peak_memory_mib_per_rank"] == [r["peak_memory_mib"]]
        assert held_mib <= r["peak_memory_mib"] < total_mib, (r, held_mib)
    figure("peak MiB", max(r["peak_memory_mib"] for r in rows))
    figure("must hold MiB", held_mib)
    # the reader itself, in this process: a known allocation moves it, and it is max_memory_allocated
    torch.cuda.reset_peak_memory_stats(0)
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    assert peak_memory_bytes(torch.device("cuda", 0)) == torch.cuda.max_memory_allocated(0) >= block.numel()
    del block

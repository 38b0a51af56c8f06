"""metrics.py: peak FLOP/s by device name and MFU (the per-rank peak memory is checked on real runs in
test_train.py and test_ddp.py)."""

from __future__ import annotations

import pytest
import torch

from dtrain import metrics


def test_mfu_needs_a_known_device(monkeypatch):
    """peak_flops reads the CUDA device name; no GPU here, so the name is patched (a mock, said so)."""
    assert metrics.peak_flops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert metrics.peak_flops(torch.device("cuda")) == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert metrics.peak_flops(torch.device("cuda")) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert metrics.peak_flops(torch.device("cuda")) is None
    assert metrics.mfu(1000.0, 6e9, None) is None
    assert metrics.mfu(1000.0, 6e9, 989e12) == pytest.approx(1000 * 6e9 / 989e12)

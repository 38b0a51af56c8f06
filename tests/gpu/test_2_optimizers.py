"""Check 2, the 8-bit optimizers on CUDA: bitsandbytes' `adamw_8bit` and `paged_adamw_8bit` and torchao's
`adamw_8bit_ao` keep uint8 state, about 2 bytes a parameter (fp32 AdamW keeps 8), and train; the paged one
really pages its large states (CUDA managed memory). On CPU (tests/test_profiles_matrix.py, test_optim.py)
bitsandbytes runs its CPU code and never pages."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_ok, train_rows

from .common import finite_and_falling, losses, run_info, uses

pytestmark = pytest.mark.gpu
EIGHT_BIT = ["adamw_8bit", "paged_adamw_8bit", "adamw_8bit_ao"]


@uses(*EIGHT_BIT)
@pytest.mark.parametrize("name", EIGHT_BIT)
def test_eight_bit_state_is_uint8_about_2_bytes_a_parameter_and_the_loss_falls(runs, figure, name):
    """uint8 optimizer state of about 2 bytes a parameter on the GPU, and a falling loss."""
    run = runs[name]
    assert_ok(run.proc)
    assert run_info(run.out)["distributed"]["device"].startswith("cuda")
    first = next(r for r in train_rows(run.out) if "optim_state_bytes_per_param" in r)
    per_param = first["optim_state_bytes_per_param"]
    figure("state bytes/param", per_param)
    figure("state dtypes", first["optim_state_dtypes"])
    # two uint8 moments (2 bytes) plus their block scales and quantisation maps (~0.06 here); the 1-D
    # tensors under 4,096 elements keep fp32 state by the libraries' design
    assert "uint8" in first["optim_state_dtypes"].split(","), first
    assert 1.9 < per_param < 2.5, first
    got = losses(run.out)
    figure("loss first", got[0])
    figure("loss last", got[-1])
    assert finite_and_falling(got), got


@pytest.mark.parametrize("name,paged", [("paged_adamw_8bit", True), ("adamw_8bit", False)])
def test_the_paged_optimizer_pages_its_large_state_on_cuda(name, paged):
    """paged_adamw_8bit keeps the state of a >= 1e5-element CUDA parameter in paged (managed) memory,
    adamw_8bit in ordinary device memory; both uint8, both update the weight."""
    pytest.importorskip("bitsandbytes")
    from dtrain.config import OptimConfig
    from dtrain.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 256)).cuda()  # 131,072 weights, 256 biases
    weight, bias = model[0].weight, model[0].bias
    before = weight.detach().clone()
    optimizer = build_optimizer(model, OptimConfig(name=name, lr=1e-2), torch.device("cuda"))
    model(torch.randn(8, 512, device="cuda")).square().mean().backward()
    optimizer.step()
    big, small = optimizer.state[weight], optimizer.state[bias]
    assert big["state1"].dtype == torch.uint8 and big["state2"].dtype == torch.uint8
    assert bool(getattr(big["state1"], "is_paged", False)) is paged  # bitsandbytes marks what it pages
    assert small["state1"].dtype == torch.float32  # under 4,096 elements: fp32 state, never paged
    assert not getattr(small["state1"], "is_paged", False)
    assert not torch.equal(weight.detach(), before)

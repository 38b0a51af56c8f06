"""Check 5, the sharded profiles on one GPU: `dtrain launch fsdp --gpus 1` and `dtrain launch zero3 --gpus 1`
(NCCL, bf16) start, save, resume from the mid-run checkpoint with bitwise the straight run's losses and final
weights, and export a plain Hugging Face model that reloads and generates on the GPU. The CPU suite
(tests/test_profiles_matrix.py) runs the same on gloo ranks in fp32."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_ok, run_dtrain, train_rows
from safetensors.torch import load_file

from .common import checkpoint, run_info, uses

pytestmark = pytest.mark.gpu
KIND = {"fsdp": "FSDP", "zero3": "DEEPSPEED"}


@uses("fsdp", "zero3", "fsdp_resumed", "zero3_resumed")
@pytest.mark.parametrize("profile", ["fsdp", "zero3"])
def test_profile_on_one_gpu_trains_saves_resumes_bitwise_and_exports(runs, figure, tmp_path, profile):
    """`dtrain launch PROFILE --gpus 1` trains, saves, resumes bitwise and exports on the GPU."""
    from transformers import AutoModelForCausalLM

    straight = runs[profile]
    assert_ok(straight.proc)
    assert f"accelerate_configs/{profile}.yaml" in straight.proc.stdout  # the command is printed
    info = run_info(straight.out)["distributed"]
    assert info["type"].endswith(KIND[profile]) and info["num_processes"] == 1, info
    assert info["device"].startswith("cuda") and info["mixed_precision"] == "bf16", info
    marker = json.loads((checkpoint(straight.out, 6) / "dtrain_checkpoint.json").read_text())
    assert marker["profile"] == profile and marker["world_size"] == 1
    assert (checkpoint(straight.out, 6) / "deepspeed").is_dir() == (profile == "zero3")
    rows = {r["step"]: r["loss"] for r in train_rows(straight.out)}
    assert sorted(rows) == list(range(1, 7)) and rows[6] < rows[1], rows

    resumed = runs[f"{profile}_resumed"]
    assert_ok(resumed.proc)
    assert "resuming from" in resumed.proc.stdout
    again = {r["step"]: r["loss"] for r in train_rows(resumed.out)}
    assert sorted(again) == [4, 5, 6]
    assert all(again[s] == rows[s] for s in again), (rows, again)  # bitwise
    a, b = (load_file(run.out / "final" / "model.safetensors") for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    figure("straight s", straight.seconds)
    figure("resume s", resumed.seconds)

    # `dtrain export` of the mid-run checkpoint (one process, no GPU needed) and the final/ export both reload
    assert_ok(run_dtrain("export", str(checkpoint(straight.out, 3)), str(tmp_path / "step3")))
    step3 = load_file(tmp_path / "step3" / "model.safetensors")
    assert step3.keys() == a.keys() and all(v.dtype == torch.float32 for v in step3.values())
    assert any(not torch.equal(step3[k], a[k]) for k in a)  # steps 4..6 trained on
    model = AutoModelForCausalLM.from_pretrained(straight.out / "final").cuda().eval()
    ids = torch.tensor([[1, 5, 6]], device="cuda")
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] > ids.shape[1]

"""Check 3, QLoRA on CUDA in bf16: the base is quantised to 4-bit NF4 onto the GPU (bitsandbytes' CUDA
kernels), the adapters train, the merged export is a plain full-precision model that reloads and runs; and
the figure QLoRA exists for, the peak GPU memory of the run against LoRA on the full-precision base. The
CPU suite (tests/test_peft.py) runs bitsandbytes' CPU 4-bit code, where memory is not the point."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_ok, train_rows
from safetensors.torch import load_file

from .common import finite_and_falling, losses, run_info, uses

pytestmark = pytest.mark.gpu


def peak_mib(out) -> float:
    return max(r["peak_memory_mib"] for r in train_rows(out))


@pytest.fixture(scope="module")
def base(runs):
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from .common import qlora_base

    return runs.input("qlora_base", qlora_base)  # (model directory, data), the runs' own


def test_the_4bit_base_is_quantised_onto_the_gpu(base, figure):
    """dtrain's quantisation config puts the base on the GPU as 4-bit Linear4bit weights (uint8 storage)."""
    from transformers import AutoModelForCausalLM

    from dtrain.peft import quantization_config

    model_dir, _ = base
    quantized = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization_config("bf16"), device_map={"": 0}
    )
    layer = quantized.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == "Linear4bit"
    assert layer.weight.device.type == "cuda" and layer.weight.dtype == torch.uint8
    assert layer.weight.quant_state is not None and layer.compute_dtype == torch.bfloat16
    full = sum(t.numel() * 4 for t in load_file(model_dir / "model.safetensors").values())
    ratio = quantized.get_memory_footprint() / full
    figure("4-bit / fp32 bytes", ratio)
    assert ratio < 0.25  # 4 bits of 32, plus the unquantised embedding, norms and quantisation constants
    del quantized
    torch.cuda.empty_cache()


@uses("qlora", "lora")
def test_qlora_trains_adapters_and_its_merged_export_reloads(runs, base, figure):
    """QLoRA in bf16 on the GPU: the adapters train (falling loss) and the merged export reloads as a plain
    fp32 model that runs on the GPU."""
    from transformers import AutoModelForCausalLM

    model_dir, _ = base
    run = runs["qlora"]
    assert_ok(run.proc)
    info = run_info(run.out)
    assert info["peft"]["method"] == "qlora" and info["peft"]["gradient_checkpointing"]
    assert (
        info["distributed"]["device"].startswith("cuda") and info["distributed"]["mixed_precision"] == "bf16"
    )
    got = losses(run.out)
    figure("loss first", got[0])
    figure("loss last", got[-1])
    assert finite_and_falling(got), got
    merged, original = (
        load_file(run.out / "final" / "model.safetensors"),
        load_file(model_dir / "model.safetensors"),
    )
    q = "model.layers.0.self_attn.q_proj.weight"
    assert merged[q].dtype == torch.float32 and not torch.equal(merged[q], original[q])  # adapters folded in
    embed = "model.embed_tokens.weight"
    assert torch.equal(merged[embed], original[embed])  # not a target: the base's own
    model = AutoModelForCausalLM.from_pretrained(run.out / "final").cuda().eval()
    ids = torch.tensor([[1, 5, 6, 7]], device="cuda")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] > ids.shape[1]


@uses("qlora", "lora")
def test_qlora_peaks_far_below_lora_on_the_full_precision_base(runs, base, figure):
    """Peak GPU memory (`peak_memory_mib`, max_memory_allocated) of QLoRA against LoRA on the fp32 base,
    same adapters, data and steps: the 4-bit base is what QLoRA saves."""
    model_dir, _ = base
    lora, qlora = runs["lora"], runs["qlora"]
    assert_ok(lora.proc)
    assert_ok(qlora.proc)
    assert finite_and_falling(losses(lora.out))
    base_mib = (
        sum(t.numel() * t.element_size() for t in load_file(model_dir / "model.safetensors").values()) / 2**20
    )
    lora_peak, qlora_peak = peak_mib(lora.out), peak_mib(qlora.out)
    figure("LoRA peak MiB", lora_peak)
    figure("QLoRA peak MiB", qlora_peak)
    figure("QLoRA / LoRA", qlora_peak / lora_peak)
    assert lora_peak >= base_mib, (lora_peak, base_mib)  # LoRA holds the whole fp32 base on the GPU
    assert qlora_peak < 0.5 * lora_peak, (qlora_peak, lora_peak)

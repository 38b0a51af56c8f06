"""LoRA and QLoRA through peft (`--peft.method lora|qlora`), on a user's pretrained directory: adapters only
train, checkpoints hold only them (plus their optimizer state and the base's fingerprint), resume is exact,
the export merges them (or writes the adapter directory), and 2 CPU ranks under every allowed profile give
the losses of one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY,
    assert_ok,
    dtrain_launch,
    run_dtrain,
    run_train,
    save_pretrained_dir,
    train_rows,
)
from safetensors.torch import load_file

from dtrain.tasks import build_char_tokenizer

LORA = [
    "--peft.method",
    "lora",
    "--peft.r",
    "8",
    "--peft.alpha",
    "16",
    "--train.max_steps",
    "6",
    "--eval.num_generate",
    "0",
    "--eval.num_samples",
    "0",
    "--optim.lr",
    "1e-2",
]


def write_capitals(path: Path) -> Path:
    """Alpaca rows that ask for a word in capitals (64 of them, 8 words repeated 1-3 times), as JSONL."""
    words = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "piano"]
    rows = [
        {
            "instruction": "Write the word in capitals.",
            "input": w * (1 + i % 3),
            "output": (w * (1 + i % 3)).upper(),
        }
        for i, w in enumerate(words * 8)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A user's Qwen2 directory (tied embeddings, biases on q/k/v) saved with the character tokenizer."""
    root = tmp_path_factory.mktemp("qwen2_base")
    write_capitals(root.parent / "data.jsonl")
    return save_pretrained_dir(root / "model", "qwen2", build_char_tokenizer(), seed=3)


def lora_args(base: Path, out: Path, *extra: str) -> list[str]:
    data = Path(base).parent.parent / "data.jsonl"
    return [
        *TINY,
        *LORA,
        "--model.name_or_path",
        str(base),
        "--data.path",
        str(data),
        "--data.template",
        "alpaca",
        "--output_dir",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def single(base_dir, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("lora_single") / "run"
    proc = run_train(lora_args(base_dir, out))
    assert_ok(proc)
    return out, proc.stdout


def test_only_the_adapters_train_and_the_startup_line_says_how_many(single, base_dir):
    out, stdout = single
    info = json.loads((out / "run_info.json").read_text())["peft"]
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert info["trainable_parameters"] == trainable and info["total_parameters"] == total
    assert info["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert f"({100 * trainable / total:.2f}%)" in stdout and "LoRA r8 alpha 16 on down_proj," in stdout
    # the base is untouched: every weight LoRA does not target is bitwise the base's in the merged export
    merged, base = load_file(out / "final" / "model.safetensors"), load_file(base_dir / "model.safetensors")
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )


def test_a_checkpoint_holds_the_adapters_and_their_optimizer_state_only(single):
    import torch.distributed.checkpoint as dcp

    out, _ = single
    ckpt = out / "checkpoints" / "step-00000003"
    keys = list(dcp.FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata)
    weights = [k for k in keys if k.startswith("model.") and k.endswith("weight")]
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights), weights
    assert any(k.startswith("optim.state.") and "lora_A" in k for k in keys)
    marker = json.loads((ckpt / "dtrain_checkpoint.json").read_text())
    assert marker["model"]["base"]["name_or_path"].endswith("qwen2_base0/model")
    assert len(marker["model"]["base"]["fingerprint"]) == 32


def test_merged_and_unmerged_exports_give_the_same_logits(single, base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = single
    assert_ok(run_dtrain("export", str(out), str(tmp_path / "adapter"), "--adapter-only"))
    assert_ok(run_dtrain("export", str(out), str(tmp_path / "merged")))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # a plain model: no peft needed
    ids = torch.tensor([[1, 20, 31, 42, 53, 64, 75, 12]])
    with torch.no_grad():
        a, b = unmerged(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    final = load_file(out / "final" / "model.safetensors")  # final/ is the same merged export
    exported = load_file(tmp_path / "merged" / "model.safetensors")
    assert final.keys() == exported.keys() and all(torch.equal(final[k], exported[k]) for k in final)
    with torch.no_grad():  # and the adapters changed the model
        assert not torch.allclose(a, AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=ids).logits)


def test_resume_is_exact_and_a_changed_base_is_refused(single, base_dir, tmp_path):
    out, _ = single
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    assert_ok(run_train(lora_args(base_dir, resumed)))
    a = {r["step"]: r["loss"] for r in train_rows(out)}
    b = {r["step"]: r["loss"] for r in train_rows(resumed)}
    assert sorted(b) == [4, 5, 6] and all(a[s] == b[s] for s in b), (a, b)
    # the same path now holding other weights (a re-download, another fine-tune saved over it)
    again = tmp_path / "again"
    (again / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-00000003", again / "checkpoints" / "step-00000003")
    shutil.copytree(base_dir, tmp_path / "moved_base")
    save_pretrained_dir(base_dir, "qwen2", build_char_tokenizer(), seed=4)  # changed in place
    try:
        proc = run_train(lora_args(base_dir, again))
    finally:
        shutil.rmtree(base_dir)
        shutil.copytree(tmp_path / "moved_base", base_dir)  # put the module's base back
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds adapters trained on the base" in proc.stderr and "--model.name_or_path" in proc.stderr


@pytest.mark.parametrize("profile", ["ddp", "fsdp", "zero2", "zero3"])
def test_two_ranks_give_the_losses_of_one_process(single, base_dir, tmp_path, profile):
    """The same global batch (2 ranks x 2 = 1 process x 4); FSDP2 wraps decoder layers whose frozen base and
    trainable adapters share one unit; ZeRO-3 partitions both. The adapters-only checkpoint and the merged
    final/ come out of every profile."""
    out = tmp_path / "run"
    proc = dtrain_launch(profile, lora_args(base_dir, out, "--train.per_device_batch_size", "2"))
    assert_ok(proc)
    one = {r["step"]: r["loss"] for r in train_rows(single[0])}
    two = {r["step"]: r["loss"] for r in train_rows(out)}
    assert one.keys() == two.keys()
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5 * abs(one[step]), (profile, step, one[step], two[step])
    merged_one = load_file(single[0] / "final" / "model.safetensors")
    merged_two = load_file(out / "final" / "model.safetensors")
    for k in merged_one:
        torch.testing.assert_close(merged_two[k], merged_one[k], rtol=1e-4, atol=1e-5, msg=k)
    if profile == "ddp":  # and the 2-rank adapter checkpoint resumes with bitwise-equal losses
        resumed = tmp_path / "resumed"
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copytree(out / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
        assert_ok(dtrain_launch(profile, lora_args(base_dir, resumed, "--train.per_device_batch_size", "2")))
        again = {r["step"]: r["loss"] for r in train_rows(resumed)}
        assert sorted(again) == [4, 5, 6] and all(again[s] == two[s] for s in again), (two, again)


# --------------------------------------------------------------------------------------------
# QLoRA: a 4-bit NF4 base (bitsandbytes runs 4-bit on CPU since 0.4x), single and ddp
# --------------------------------------------------------------------------------------------

QLORA = ["--peft.method", "qlora"]


@pytest.fixture(scope="module")
def qlora_base(base_dir, tmp_path_factory) -> Path:
    """The same family 64 wide: bitsandbytes' CPU 4-bit kernel works in blocks of 64 input features."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen2", build_char_tokenizer())
    config.hidden_size, config.intermediate_size = 64, 128
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("qwen2_64") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qlora_single(qlora_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qlora_single") / "run"
    assert_ok(run_train(lora_args(qlora_base, out, *QLORA)))
    return out


def test_qlora_trains_adapters_on_a_4bit_base_with_checkpointing_on(qlora_single, qlora_base, tmp_path):
    info = json.loads((qlora_single / "run_info.json").read_text())["peft"]
    assert info["method"] == "qlora" and info["gradient_checkpointing"]
    # the 4-bit base counted at its real size, not its packed storage: as LoRA on the full-precision base
    lora = tmp_path / "lora"
    assert_ok(run_train(lora_args(qlora_base, lora, "--train.max_steps", "1")))
    plain = json.loads((lora / "run_info.json").read_text())["peft"]
    assert not plain["gradient_checkpointing"]
    assert (info["trainable_parameters"], info["total_parameters"]) == (
        plain["trainable_parameters"],
        plain["total_parameters"],
    )
    from transformers import AutoModelForCausalLM

    from dtrain.peft import quantization_config

    quantized = AutoModelForCausalLM.from_pretrained(
        qlora_base, quantization_config=quantization_config("no")
    )
    assert type(quantized.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"  # what the run trained on
    losses = [r["loss"] for r in train_rows(qlora_single)]
    assert losses[-1] < losses[0]  # it learns
    # the merged export folds the adapters into the full-precision base: a plain, unquantised model
    merged = load_file(qlora_single / "final" / "model.safetensors")
    assert merged["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32


def test_qlora_on_two_ddp_ranks_gives_the_losses_of_one_process(qlora_single, qlora_base, tmp_path):
    out = tmp_path / "run"
    assert_ok(dtrain_launch("ddp", lora_args(qlora_base, out, *QLORA, "--train.per_device_batch_size", "2")))
    one = {r["step"]: r["loss"] for r in train_rows(qlora_single)}
    two = {r["step"]: r["loss"] for r in train_rows(out)}
    assert one.keys() == two.keys()
    assert all(abs(two[s] - one[s]) <= 1e-5 * abs(one[s]) for s in one), (one, two)


@pytest.mark.parametrize("profile", ["fsdp", "zero2", "zero3"])
def test_qlora_under_a_sharding_profile_is_refused_before_launch(profile, base_dir):
    from dtrain import launch
    from dtrain.config import parse_config

    cfg = parse_config(lora_args(base_dir, base_dir.parent / "unused", *QLORA))
    problems = launch.preflight(
        launch.load_profile(profile), cfg, gpus=2, cpu=True, gpus_present=0, bf16_ok=False
    )
    assert (
        len(problems) == 1 and "--peft.method qlora cannot run under" in problems[0] and "ddp" in problems[0]
    )
    lora = parse_config(["--peft.method", "lora"])
    assert (
        launch.preflight(launch.load_profile(profile), lora, gpus=2, cpu=True, gpus_present=0, bf16_ok=False)
        == []
    )


def test_qlora_needs_a_pretrained_base():
    from dtrain.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="--peft.method qlora loads a pretrained base in 4-bit"):
        parse_config(["--peft.method", "qlora"])


def test_an_8bit_optimizer_updates_the_adapters_only(qlora_base, tmp_path):
    """Rank 64 on the 64-wide base: every adapter matrix has the 4096 elements from which bitsandbytes keeps
    8-bit state (smaller tensors keep fp32 state, by its design)."""
    out = tmp_path / "run"
    assert_ok(
        run_train(
            lora_args(
                qlora_base, out, "--optim.name", "adamw_8bit", "--train.max_steps", "3", "--peft.r", "64"
            )
        )
    )
    rows = train_rows(out)
    first = next(r for r in rows if "optim_state_bytes_per_param" in r)
    # bitsandbytes keeps two uint8 moments (~2 bytes) per adapter parameter; the frozen base has none
    assert "uint8" in first["optim_state_dtypes"] and 1.9 < first["optim_state_bytes_per_param"] < 3.0
    info = json.loads((out / "run_info.json").read_text())["peft"]
    # the bytes above are per adapter parameter
    assert info["trainable_parameters"] < info["total_parameters"]


def test_the_lora_recipe_runs_on_the_embedded_default(tmp_path):
    """dtrain/recipes/sft_lora.yaml, cut to 2 steps (its full 1000-step run is measured in the README)."""
    from conftest import REPO

    recipe = REPO / "dtrain" / "recipes" / "sft_lora.yaml"
    out = tmp_path / "run"
    proc = run_train(
        [
            "--config",
            str(recipe),
            "--output_dir",
            str(out),
            "--train.max_steps",
            "2",
            "--data.synthetic_train_examples",
            "200",
            "--eval.num_generate",
            "8",
            "--log.progress_bar",
            "false",
            "--log.plots",  # the tests' recipes draw nothing (dtrain plot draws afterwards)
            "false",
        ]
    )
    assert_ok(proc)
    info = json.loads((out / "run_info.json").read_text())["peft"]
    assert info["method"] == "lora" and info["modules_to_save"] == ["embed_tokens"]
    from conftest import read_metrics

    assert [r["step"] for r in read_metrics(out) if "eval_exact_match" in r] == [0, 2]  # baseline, then final

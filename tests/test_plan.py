"""`dtrain plan` (dtrain/plan/) against what really happens: the bytes each profile's ranks hold (read from
the shared profile-matrix runs, no launch of its own), the bytes a real training forward saves for
backward, the real peak of the loss, and the recommendation on hand-made cases."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import HSDP_BATCH, PROFILE_SHAPE, TINY, read_metrics

from dtrain.config import parse_config
from dtrain.plan import candidates, main, make_plan, memory_warning, split_plan_args
from dtrain.plan.activations import ActivationModel, Activations, Fit, count_saved, measure
from dtrain.plan.choose import recommend
from dtrain.plan.devices import GiB, parse_size
from dtrain.plan.memory import estimate, logits_bytes
from dtrain.plan.model import ModelShape, decoder_layers, shape_of

STATES_RTOL = 0.10  # the bound for weights, gradients and optimizer state
ACTIVATIONS_RTOL = 0.15


# --------------------------------------------------------------------------------------------
# Model states: the planner against the bytes every rank of the profile matrix held (first metrics row)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["ddp", "fsdp", "hsdp", "zero1", "zero2", "zero3"])
def test_states_match_what_the_ranks_hold(profile, profile_runs):
    out, _ = profile_runs(profile)
    held = next(r for r in read_metrics(out) if "held_params_bytes" in r)
    cfg = parse_config([*PROFILE_SHAPE, *(HSDP_BATCH if profile == "hsdp" else []), "--output_dir", str(out)])
    shape = shape_of(cfg)
    gpus, nodes = (2, 2) if profile == "hsdp" else (2, 1)  # the 2 x 2 mesh: as 2 nodes of 2, a replica each
    cand = next(c for c in candidates(cfg, gpus, nodes) if c.name == profile)
    acts = measure(shape.config, torch.float32, cfg.data.max_length)
    e = estimate(shape, acts, cand.setting)
    # DeepSpeed's fp32 master copy is part of the planner's optimizer column
    pairs = {
        "weights": (e.weights, held["held_params_bytes"]),
        "gradients": (e.gradients, held["held_grads_bytes"]),
        "optimizer": (e.optimizer, held["held_optim_bytes"] + held["held_master_bytes"]),
    }
    if profile in ("zero1", "zero2"):  # the reduce buckets, sized by ds_configs/*.json
        pairs["buffers"] = (e.buffers, held["held_buffers_bytes"])
    for part, (estimated, measured) in pairs.items():
        assert measured > 0, (profile, part, held)
        assert estimated == pytest.approx(measured, rel=STATES_RTOL), (profile, part, estimated, measured)


# --------------------------------------------------------------------------------------------
# Activations: fake-tensor measurement at two lengths, scaled, against a real forward
# --------------------------------------------------------------------------------------------


def _configs():
    from transformers import GPT2Config, LlamaConfig

    llama = LlamaConfig(
        vocab_size=500,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    gpt2 = GPT2Config(vocab_size=500, n_embd=64, n_layer=3, n_head=4, n_positions=512)
    llama._attn_implementation = gpt2._attn_implementation = "sdpa"
    return {"llama": llama, "gpt2": gpt2}


def _real_saved(config, batch: int, seq: int, checkpointing: bool) -> float:
    """Bytes a real training forward (dtrain's own, real tensors) saves for backward, parameters excluded."""
    from transformers import AutoModelForCausalLM

    from dtrain.loss import forward_logits

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    inside, outside = count_saved(
        model, decoder_layers(model), lambda: forward_logits(model, {"input_ids": ids})
    )
    return inside + outside


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_activations_match_a_real_forward(arch, checkpointing):
    config = _configs()[arch]
    acts = measure(config, torch.float32, 128)  # fitted at 64 and 128 tokens, one sequence
    batch, seq = 3, 96  # neither measured point: the fit and the batch scaling are what is checked
    side = acts.checkpointed if checkpointing else acts.plain
    assert "measured on fake tensors" in side.how
    estimated = side.saved(batch, seq)
    real = _real_saved(config, batch, seq, checkpointing)
    assert estimated == pytest.approx(real, rel=ACTIVATIONS_RTOL), (arch, checkpointing, estimated, real)
    if checkpointing:  # the recompute peak of one layer comes on top, and checkpointing saves far less
        assert acts.bytes(batch, seq, True) > estimated
        assert acts.bytes(batch, seq, True) < 0.6 * acts.bytes(batch, seq, False)


def test_eager_attention_grows_with_the_square_of_the_length():
    config = _configs()["llama"]
    config._attn_implementation = "eager"  # keeps the [s, s] probabilities for backward
    acts = measure(config, torch.float32, 128)
    assert acts.plain.layer.square > 0
    real = _real_saved(config, 2, 256, False)  # twice the longest measured length
    assert acts.plain.saved(2, 256) == pytest.approx(real, rel=ACTIVATIONS_RTOL)


# --------------------------------------------------------------------------------------------
# Logits and loss: the term against the real peak of dtrain's loss, plain and chunked
# --------------------------------------------------------------------------------------------


def _peak_bytes(fn) -> float:
    """The CPU allocator's peak over `fn`, from the profiler's memory events (relative to its start)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [0, 128], ids=["plain", "chunked"])
def test_logits_term_matches_the_peak_of_the_loss(dtype, chunk):
    from dtrain.loss import chunked_loss_sum, token_loss_sum

    batch, seq, hidden, vocab = 4, 128, 32, 8000
    torch.manual_seed(0)
    h = torch.randn(batch, seq, hidden, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))

    def step():
        if chunk:
            loss = chunked_loss_sum(h, labels, w, None, chunk)
        else:
            loss = token_loss_sum(torch.nn.functional.linear(h, w), labels)
        loss.backward()

    gradients = (h.numel() + w.numel()) * h.element_size()  # the planner counts these elsewhere
    real = _peak_bytes(step) - gradients
    estimated = logits_bytes(batch * seq, vocab, h.element_size(), chunk)
    assert estimated == pytest.approx(real, rel=ACTIVATIONS_RTOL), (dtype, chunk, estimated, real)
    if chunk:
        assert estimated < logits_bytes(batch * seq, vocab, h.element_size()) / 3


# --------------------------------------------------------------------------------------------
# The recommendation, on hand-made models (shipped profiles, made-up sizes)
# --------------------------------------------------------------------------------------------


def _shape(params: float, hidden: int = 4096, layers: int = 32, vocab: int = 32000) -> ModelShape:
    n = int(params)
    return ModelShape(
        architecture="Made-up",
        config=None,
        params=n,
        trainable=n,
        linear=int(n * 0.9),
        embedding=vocab * hidden,
        layers=layers,
        hidden=hidden,
        vocab=vocab,
        largest_unit=int(n * 0.9 / layers),
        weight_bytes=4.0 * n,
        dtype_bytes=4,
        trainable_shapes=[(n,)],
    )


# ~34 bytes per token and hidden unit per layer, as for a Llama with flash attention, in bf16
ACTS = ActivationModel(
    Activations(Fit(34 * 4096, 0.0), Fit(8 * 4096, 0.0), 32, "made up"),
    Activations(Fit(2 * 4096, 0.0), Fit(8 * 4096, 0.0), 32, "made up"),
)


def _recommend(params: float, gpus: int, memory: str, batch: int = 8, extra: tuple = (), nodes: int = 1):
    cfg = parse_config(
        [
            *TINY,
            "--train.mixed_precision",
            "bf16",
            "--data.max_length",
            "2048",
            "--train.per_device_batch_size",
            str(batch),
            *extra,
        ]
    )
    cands = candidates(cfg, gpus, nodes)
    rows, choice = recommend(_shape(params), ACTS, cands, batch, parse_size(memory), cfg)
    return rows, choice, cfg


def test_a_small_model_gets_ddp_at_the_largest_micro_batch_that_fits():
    rows, choice, _ = _recommend(0.35e9, 8, "80GiB")
    assert choice.estimate.setting.profile == "ddp"
    s = choice.estimate.setting
    assert s.micro_batch * s.accumulation == 8 and not choice.savers
    bigger = replace(s, micro_batch=s.micro_batch * 2, accumulation=max(1, s.accumulation // 2))
    assert s.micro_batch == 8 or not estimate(_shape(0.35e9), ACTS, bigger).fits(parse_size("80GiB"))
    assert {r.candidate.name for r in rows} >= {"ddp", "zero1", "zero2", "zero3", "fsdp", "zero3_offload"}
    assert "single_gpu" not in {r.candidate.name for r in rows}  # one process cannot serve 8 GPUs


def test_a_model_whose_states_fill_a_gpu_needs_full_sharding():
    _, choice, _ = _recommend(20e9, 8, "80GiB")
    assert choice.estimate.setting.profile in ("fsdp", "zero3")
    assert choice.estimate.total <= 0.9 * parse_size("80GiB")


def test_on_several_nodes_sharding_inside_a_node_is_preferred():
    """hsdp divides the states by the processes of one node (its dp_shard), not by the world: on 4 nodes x 8 its
    states are those of fsdp on one node of 8, and it is chosen over full sharding when they fit."""
    rows, choice, _ = _recommend(28e9, 8, "80GiB", nodes=4)
    assert choice.estimate.setting.profile == "hsdp"
    states = {
        r.candidate.name: r.estimate.weights + r.estimate.gradients + r.estimate.optimizer for r in rows
    }
    one_node, _, _ = _recommend(28e9, 8, "80GiB")
    fsdp_on_8 = next(r.estimate for r in one_node if r.candidate.name == "fsdp")
    assert states["hsdp"] == fsdp_on_8.weights + fsdp_on_8.gradients + fsdp_on_8.optimizer
    assert states["fsdp"] == pytest.approx(states["hsdp"] / 4)  # fsdp on 32 ranks
    assert "hsdp" not in {r.candidate.name for r in one_node}  # one node: the fsdp row is the same thing


def test_a_model_too_big_for_its_gpus_is_offloaded():
    _, choice, _ = _recommend(7e9, 1, "80GiB", batch=4)
    assert choice.estimate.setting.profile.endswith("_offload")


def test_a_model_that_fits_nowhere_says_what_would_make_it_fit():
    cfg = parse_config([*TINY, "--train.mixed_precision", "bf16", "--data.max_length", "2048"])
    shape, device = _shape(70e9, hidden=8192, layers=80), parse_size("3GiB")
    cands = candidates(cfg, 2, 1)
    rows, choice = recommend(shape, ACTS, cands, 8, device, cfg)
    assert choice is None and all(r.fits is False for r in rows if r.estimate)
    from dtrain.plan.choose import what_would_fit

    advice = what_would_fit(shape, ACTS, cands, 8, device, cfg)
    assert "--peft.method lora" in advice
    needed = int(advice.split("or on GPUs with ")[1].split()[0])
    # and it does fit on GPUs of that size: the advice is a real answer
    _, again = recommend(shape, ACTS, cands, 8, needed * GiB, cfg)
    assert again is not None and again.estimate.total <= 0.9 * needed * GiB


def test_memory_savers_only_when_needed_and_said():
    _, plain, _ = _recommend(1e9, 8, "80GiB")
    assert plain.savers == []
    _, tight, _ = _recommend(1e9, 8, "12GiB")
    assert tight.savers and tight.estimate.total <= 0.9 * parse_size("12GiB")


# --------------------------------------------------------------------------------------------
# The command, the JSON, the launch's warning
# --------------------------------------------------------------------------------------------


def test_plan_command_prints_a_table_json_and_a_line_that_launches(capsys):
    from dtrain.launch import load_profile, parse_args, preflight

    argv = [*TINY, "--gpus", "2", "--gpu-memory", "16GiB", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    rows = {r["profile"]: r for r in plan["rows"]}
    assert set(rows) >= {"ddp", "fsdp", "zero1", "zero2", "zero3", "fsdp_offload", "zero2_offload"}
    for r in rows.values():
        parts = sum(
            r[p]
            for p in ("weights", "gradients", "optimizer", "activations", "logits", "buffers", "overhead")
        )
        assert r["total"] == pytest.approx(parts, abs=8)
    rec = plan["recommended"]
    assert rec["profile"] == "ddp"  # a 20k-parameter model: the least sharding
    words = rec["command"].split()
    assert words[:2] == ["dtrain", "launch"]
    args, train = parse_args(words[2:])
    cfg = parse_config(train)
    assert preflight(load_profile(args.profile), cfg, 2, True, 0, False) == []
    t = cfg.train
    assert t.per_device_batch_size * t.gradient_accumulation_steps == 4 * 1  # the smoke recipe's, kept

    assert main([*TINY, "--gpus", "2", "--gpu", "H100"]) == 0
    text = capsys.readouterr().out
    assert "recommended: ddp" in text and "dtrain launch ddp --gpus 2 --" in text
    assert "activations measured on fake tensors" in text and "fits: total <= 90%" in text

    # a profile the recipe cannot run is a short row; its reason is spelled out once, under the table, in full
    assert main([*TINY, "--gpus", "2", "--gpu", "H100", "--checkpoint.async_save", "true"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("profile"))
    assert "micro x accum  weights" in header  # the columns keep their own widths
    assert [line.split() for line in lines if line.startswith("zero3 ")] == [["zero3", "refused"]]
    why = [line for line in lines if line.startswith("refused (")]
    assert len(why) == 1 and why[0].startswith("refused (zero1, zero2, zero3")
    assert why[0].endswith("use --checkpoint.async_save false under DeepSpeed")


def test_plan_flags_are_split_from_training_flags():
    args, train = split_plan_args(["--config", "r.yaml", "--gpus", "4", "--train.max_steps", "5", "--json"])
    assert (args.gpus, args.json, train) == (4, True, ["--config", "r.yaml", "--train.max_steps", "5"])
    # or after `--`, as `dtrain launch` takes them
    args, train = split_plan_args(["--gpus", "4", "--", "--config", "r.yaml", "--train.max_steps", "5"])
    assert (args.gpus, train) == (4, ["--config", "r.yaml", "--train.max_steps", "5"])
    assert (
        parse_size("80GB") == 80 * 10**9 and parse_size("80GiB") == 80 * GiB and parse_size("512MiB") == 2**29
    )


def test_launch_warns_when_the_estimate_exceeds_the_gpu(tmp_path, monkeypatch):
    # No GPU here: a stand-in `nvidia-smi` reports one of 1 GiB (the one mock in this file: NVML cannot run
    # without a driver). The launch itself goes on to its own checks.
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '1024, Tiny GPU'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cfg = parse_config([*TINY, "--data.max_length", "128", "--train.per_device_batch_size", "64"])
    warning = memory_warning("ddp", cfg, 2, 1)
    assert warning and "more than the 1.0 GiB of this Tiny GPU" in warning and "dtrain plan" in warning
    smi.write_text("#!/bin/sh\necho '81559, NVIDIA H100 80GB HBM3'\n")
    assert memory_warning("ddp", cfg, 2, 1) is None


def test_plan_of_a_pretrained_directory_reads_its_config_only(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000).save_pretrained(tmp_path / "gpt2")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    cfg = parse_config(
        [
            "--model.name_or_path",
            str(tmp_path / "gpt2"),
            "--data.path",
            str(data),
            "--data.template",
            "text",
            "--peft.method",
            "lora",
        ]
    )
    from dtrain.plan import Device

    plan = make_plan(cfg, 1, 1, Device(parse_size("24GiB"), "L4", "--gpu"), [])
    assert plan.shape.architecture == "GPT2LMHeadModel"
    assert 0 < plan.shape.trainable < plan.shape.params / 5  # adapters only
    row = next(r for r in plan.rows if r.candidate.name == "single_gpu")
    assert row.estimate.optimizer == pytest.approx(8 * plan.shape.trainable, rel=0.01)


@pytest.mark.slow
def test_calibrate_runs_the_recommendation_and_compares(capsys):
    # one process (single_gpu), two steps of the smoke recipe on this CPU: the measured side is the process's
    # peak RSS here, an upper bound (Python and the libraries count too), so only its presence is checked
    assert main([*TINY, "--gpus", "1", "--gpu-memory", "16GiB", "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert "calibrating: dtrain launch single_gpu --gpus 1 --cpu --" in out
    line = next(x for x in out.splitlines() if "estimated / measured" in x)
    estimated, measured = (float(line.split(word)[1].split()[0]) for word in ("estimated ", "measured "))
    assert estimated > 0 and measured > 0

"""End-to-end runs of the real script (`python dtrain/train.py`) on a tiny model, one CPU process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_ok, read_metrics, run_train, train_rows

from dtrain.config import load_config_file

# 12 steps, checkpoints at 4, 8, 12 (keep_last 2), evals at 6 and 12, warmup over 2 steps.
TWELVE_STEPS = [
    "--train.max_steps",
    "12",
    "--checkpoint.save_steps",
    "4",
    "--eval.steps",
    "6",
    "--optim.lr",
    "1e-2",
    "--optim.warmup_steps",
    "2",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("tiny") / "run"
    proc = run_train([*TINY, *TWELVE_STEPS, "--output_dir", str(out)], HF_TOKEN="hf_do_not_leak_me")
    assert_ok(proc)
    return out, proc


def test_run_directory_layout(tiny_run):
    out, _ = tiny_run
    for name in (
        "config.yaml",
        "run_info.json",
        "metrics.jsonl",
        "samples.jsonl",
        "checkpoints",
        "final",
        "data/train.jsonl",
    ):
        assert (out / name).exists(), name
    final = out / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (final / name).exists(), name


def test_loss_decreases_and_rows_are_complete(tiny_run):
    out, _ = tiny_run
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_sec", "epoch"} <= r.keys()
        assert r["grad_norm"] > 0 and r["tokens_per_sec"] > 0
        assert r["mfu"] is None  # CPU: no peak to divide by, so no MFU rather than a wrong one
        assert 100 < r["peak_memory_mib"] < 20_000 and r["peak_memory_mib_per_rank"] == [r["peak_memory_mib"]]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, (rows[0]["loss"], rows[-1]["loss"])
    assert rows[-1]["tokens"] > rows[0]["tokens"] > 0
    assert rows[-1]["epoch"] == pytest.approx(12 * 4 / 240)
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(0.0 <= r["eval_exact_match"] <= 1.0 for r in evals)
    assert evals[-1]["best_loss"] == min(r["eval_loss"] for r in evals)


def test_warmup_then_decay_in_the_log(tiny_run):
    out, _ = tiny_run
    lrs = [r["lr"] for r in train_rows(out)]
    assert lrs[0] == pytest.approx(0.0) and lrs[2] == pytest.approx(1e-2)
    assert lrs[-1] < lrs[3]


def test_saved_config_reproduces_the_run(tiny_run):
    out, _ = tiny_run
    cfg = load_config_file(out / "config.yaml")
    assert cfg.train.max_steps == 12 and cfg.model.hidden_size == 32 and cfg.output_dir == str(out)
    assert load_config_file(out / "checkpoints" / "step-00000012" / "config.yaml").to_dict() == cfg.to_dict()


def test_run_info_has_what_reproduces_the_run(tiny_run):
    out, _ = tiny_run
    info = json.loads((out / "run_info.json").read_text())
    assert info["versions"]["torch"] == torch.__version__
    assert info["distributed"]["num_processes"] == 1
    assert "--output_dir" in info["command"]
    assert info["data"]["train_examples"] == 240
    assert info["model_parameters"] > 0
    assert info["environment"]["HF_TOKEN"] == "***"
    assert "hf_do_not_leak_me" not in (out / "run_info.json").read_text()


def test_checkpoints_are_committed_and_rotated(tiny_run):
    out, _ = tiny_run
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["best", "step-00000008", "step-00000012"]  # keep_last=2, step 4 rotated away
    marker = json.loads((out / "checkpoints" / "step-00000012" / "dtrain_checkpoint.json").read_text())
    assert marker["step"] == 12 and marker["train_state"]["samples_seen"] == 48
    assert marker["world_size"] == 1 and marker["profile"] == "single" and marker["format"] == "dcp"
    assert len(marker["config_sha256"]) == 16
    # the eval at step 12 (the only save step with an eval) is the best checkpoint
    assert (
        marker["eval"]["metric"] == "loss" and marker["eval"]["value"] == marker["train_state"]["best_metric"]
    )
    assert (out / "checkpoints" / "best").resolve() == (out / "checkpoints" / "step-00000012").resolve()
    for f in marker["files"]:
        assert (out / "checkpoints" / "step-00000012" / f["path"]).stat().st_size == f["bytes"]


def test_final_model_reloads_and_generates(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = tiny_run
    tok = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    ids = tok(
        "### Instruction:\nReverse the letters.\n\n### Input:\nabc\n\n### Response:\n", return_tensors="pt"
    )
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    # The exported weights are the trained ones: the last checkpoint holds the same tensors.
    from safetensors.torch import load_file

    from dtrain.export import full_state_dict

    exported = load_file(out / "final" / "model.safetensors")
    saved = full_state_dict(out / "checkpoints" / "step-00000012")
    assert exported.keys() <= saved.keys() and "model.embed_tokens.weight" in exported
    assert all(torch.equal(exported[k], saved[k]) for k in exported)


def test_samples_are_printed_and_saved(tiny_run):
    out, proc = tiny_run
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert 0 < len(samples) <= 4
    assert {"prompt", "prediction", "reference", "correct"} <= samples[0].keys()
    assert samples[0]["reference"] in proc.stdout


def test_rerun_of_a_finished_run_changes_nothing(tiny_run):
    out, _ = tiny_run
    before = (out / "metrics.jsonl").read_bytes()
    proc = run_train([*TINY, *TWELVE_STEPS, "--output_dir", str(out)])
    assert_ok(proc)
    assert "already complete at step 12" in proc.stdout
    assert (out / "metrics.jsonl").read_bytes() == before


def test_resume_auto_continues_exactly(tiny_run, tmp_path):
    """Take the straight run's step-8 checkpoint alone and resume: steps 9..12 repeat bit for bit."""
    out, _ = tiny_run
    resumed = tmp_path / "run"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-00000008", resumed / "checkpoints" / "step-00000008")
    shutil.copytree(out / "data", resumed / "data")
    proc = run_train([*TINY, *TWELVE_STEPS, "--output_dir", str(resumed)])
    assert_ok(proc)
    assert "resuming from" in proc.stdout
    straight = {r["step"]: r["loss"] for r in train_rows(out)}
    again = {r["step"]: r["loss"] for r in train_rows(resumed)}
    assert sorted(again) == [9, 10, 11, 12]
    assert all(again[s] == straight[s] for s in again), (again, straight)
    from safetensors.torch import load_file

    a, b = load_file(out / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_bf16_and_unclipped_norm(tmp_path):
    out = tmp_path / "run"
    proc = run_train(
        [
            *TINY,
            "--output_dir",
            str(out),
            "--train.gradient_accumulation_steps",
            "2",
            "--train.mixed_precision",
            "bf16",
            "--train.max_grad_norm",
            "0",
            "--checkpoint.save_steps",
            "0",
            "--eval.steps",
            "0",
            "--eval.num_generate",
            "0",
            "--train.max_steps",
            "4",
            "--log.progress_bar",
            "true",
        ]
    )
    assert_ok(proc)
    rows = train_rows(out)
    assert len(rows) == 4 and all(r["grad_norm"] > 0 for r in rows)
    # the progress bar (main process, stderr) shows the step count, loss, lr and tokens/s
    assert "train: 100%" in proc.stderr and "4/4" in proc.stderr
    assert all(key in proc.stderr for key in ("loss=", "lr=", "tokens_per_sec="))
    info = json.loads((out / "run_info.json").read_text())
    assert info["distributed"]["mixed_precision"] == "bf16"
    assert rows[-1]["epoch"] == pytest.approx(4 * 8 / 240)  # 2 micro-batches of 4 per step
    # the end always saves (and its final eval makes it the best)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "step-00000004"]


@pytest.mark.slow
def test_compile_trains_the_same_losses(tmp_path):
    """--train.compile: Accelerate's regional compilation of the decoder layers (inductor, CPU here; about
    a minute to compile on 2 cores). The losses are those of the eager model, to rounding."""
    shape = [
        *TINY,
        "--train.max_steps",
        "3",
        "--eval.steps",
        "0",
        "--eval.num_generate",
        "0",
        "--checkpoint.save_steps",
        "0",
    ]
    assert_ok(run_train([*shape, "--output_dir", str(tmp_path / "eager")]))
    assert_ok(run_train([*shape, "--output_dir", str(tmp_path / "compiled"), "--train.compile", "true"]))
    info = json.loads((tmp_path / "compiled" / "run_info.json").read_text())
    assert "LlamaDecoderLayer" in info["compiled_modules"]
    assert json.loads((tmp_path / "eager" / "run_info.json").read_text())["compiled_modules"] == []
    eager = [r["loss"] for r in train_rows(tmp_path / "eager")]
    compiled = [r["loss"] for r in train_rows(tmp_path / "compiled")]
    assert compiled == pytest.approx(eager, rel=1e-5)


def test_early_stopping(tmp_path):
    out = tmp_path / "run"
    proc = run_train(
        [
            *TINY,
            "--output_dir",
            str(out),
            "--train.max_steps",
            "40",
            "--eval.steps",
            "2",
            "--eval.metric",
            "exact_match",
            "--eval.early_stopping_patience",
            "1",
            "--optim.lr",
            "1e-5",
        ]
    )
    assert_ok(proc)
    assert "early stopping at step 4" in proc.stdout
    assert train_rows(out)[-1]["step"] == 4
    assert (out / "final" / "model.safetensors").exists()


def test_tensorboard_tracker_gets_the_same_numbers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    proc = run_train(
        [
            *TINY,
            "--output_dir",
            str(out),
            "--log.report_to",
            "tensorboard",
            "--train.max_steps",
            "3",
            "--eval.steps",
            "0",
            "--checkpoint.save_steps",
            "0",
        ]
    )
    assert_ok(proc)
    events = list((out / "logs").rglob("events.out.tfevents*"))
    assert events, list(out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("loss")}
    assert logged.keys() == {1, 2, 3}
    for row in train_rows(out):
        assert logged[row["step"]] == pytest.approx(row["loss"], rel=1e-6)


def test_windows_without_a_target_token_are_skipped_and_counted(tmp_path, tiny_model_dir):
    """Chat rows without an assistant turn train nothing: they are warned about, and a step whose whole
    window is such rows makes no update and is counted (never logged as loss 0)."""
    from dtrain.data import DataOrder

    reply = {"messages": [{"role": "user", "content": "say yes"}, {"role": "assistant", "content": "yes"}]}
    silent = {"messages": [{"role": "user", "content": "no answer here"}]}
    rows = [reply, silent, reply, silent, silent, reply]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text(json.dumps(reply) + "\n")
    out = tmp_path / "run"
    steps = 12
    proc = run_train(
        [
            "--model.name_or_path",
            str(tiny_model_dir),
            "--data.path",
            str(data),
            "--data.eval_path",
            str(eval_data),
            "--output_dir",
            str(out),
            "--log.every_steps",
            "1",
            "--train.max_steps",
            str(steps),
            "--train.per_device_batch_size",
            "1",
            "--eval.steps",
            "0",
            "--eval.num_generate",
            "0",
            "--checkpoint.save_steps",
            "0",
            "--log.progress_bar",
            "false",
            "--log.plots",  # the tests' recipes draw nothing (dtrain plot draws afterwards)
            "false",
        ]
    )
    assert_ok(proc)
    assert "3 of 6 train examples (50.0%) have no token to learn" in proc.stdout
    order = DataOrder(len(rows), 42)
    empty = [step for step in range(1, steps + 1) if rows[order.index(step - 1)] is silent]
    assert 0 < len(empty) < steps
    logged = {r["step"]: r for r in train_rows(out)}
    for step in range(1, steps + 1):
        row = logged[step]
        if step in empty:  # no forward, no update: no loss and no gradient norm
            assert row["loss"] is None and row["ppl"] is None and row["grad_norm"] is None
        else:
            assert row["loss"] > 0
        assert row.get("empty_steps", 0) == sum(1 for s in empty if s <= step)
    final_eval = [r for r in read_metrics(out) if r["step"] == steps and "loss" not in r][0]
    assert final_eval["eval_loss"] > 0
    state = json.loads((out / "checkpoints" / f"step-{steps:08d}" / "train_state.json").read_text())
    assert state["empty_steps"] == len(empty)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (1, (False, False, False)),
        (5, (True, False, False)),  # log.every_steps
        (6, (True, True, False)),  # eval.steps: an eval step is always logged
        (8, (True, False, True)),  # checkpoint.save_steps
        (24, (True, True, True)),
        (30, (True, False, False)),  # the last step: its eval and save are the final ones, not periodic
    ],
)
def test_step_plan(step, expected):
    from dtrain.config import parse_config
    from dtrain.train import StepPlan

    cfg = parse_config(["--log.every_steps", "5", "--eval.steps", "6", "--checkpoint.save_steps", "8"])
    plan = StepPlan.at(step, cfg, max_steps=30)
    assert (plan.log, plan.eval, plan.save) == expected

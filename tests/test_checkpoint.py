"""checkpoint.py and export.py: the commit protocol, retention, corruption, failed saves, config
continuity and the export, on real runs of the script (one CPU process) and real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    TINY,
    assert_ok,
    env_for_subprocess,
    fresh_accelerator,
    mount_tmpfs,
    run_dtrain,
    run_train,
    tiny_llama,
    train_rows,
)
from safetensors.torch import load_file

from dtrain.checkpoint import (
    MARKER,
    Checkpointer,
    TrainState,
    best_checkpoint,
    complete_checkpoints,
    retained,
    verify,
    write_json_atomic,
)

# 12 steps, saves at 4, 8, 12, evals at 6 and 12.
SHAPE = ["--train.max_steps", "12", "--checkpoint.save_steps", "4", "--eval.steps", "6", "--optim.lr", "1e-2"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    assert_ok(run_train([*TINY, *SHAPE, "--output_dir", str(out)]))
    return out


def resumable_copy(src: Path, dst: Path, *steps: int) -> Path:
    """A run directory holding only the given checkpoints of `src` (and its data): as if the run had
    been stopped after the last of them."""
    (dst / "checkpoints").mkdir(parents=True)
    for step in steps:
        name = f"step-{step:08d}"
        shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    shutil.copytree(src / "data", dst / "data")
    return dst


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_rows(run)}


# ------------------------------------------------------------------------------------------------
# Retention
# ------------------------------------------------------------------------------------------------


def fake_checkpoints(root: Path, evals: dict[int, float | None], metric: str = "loss") -> list[Path]:
    """Committed-looking checkpoint directories with only a marker (retention reads nothing else)."""
    for step, value in evals.items():
        d = root / f"step-{step:08d}"
        d.mkdir(parents=True)
        ev = None if value is None else {"metric": metric, "value": value}
        write_json_atomic(d / MARKER, {"step": step, "eval": ev, "files": []})
    return complete_checkpoints(root)


def test_retention_keeps_newest_best_and_milestones(tmp_path):
    done = fake_checkpoints(tmp_path, {100: 3.0, 200: 1.5, 300: None, 400: 2.0, 500: 2.5, 600: None})
    best = best_checkpoint(done, "loss")
    assert best.name == "step-00000200"
    kept = {p.name for p in retained(done, keep_last=2, keep_every=300, best=best)}
    assert kept == {"step-00000500", "step-00000600", "step-00000200", "step-00000300"}
    assert {p.name for p in retained(done, keep_last=1, keep_every=0, best=None)} == {"step-00000600"}


def test_best_for_exact_match_is_the_highest_and_the_earliest_on_a_tie(tmp_path):
    done = fake_checkpoints(tmp_path, {10: 0.2, 20: 0.5, 30: 0.5, 40: 0.1}, metric="exact_match")
    assert best_checkpoint(done, "exact_match").name == "step-00000020"
    assert best_checkpoint(done, "loss") is None  # recorded for another metric


def test_end_to_end_rotation_best_link_and_milestones(tmp_path):
    out = tmp_path / "run"
    args = [
        "--train.max_steps",
        "12",
        "--checkpoint.save_steps",
        "2",
        "--eval.steps",
        "2",
        "--checkpoint.keep_last",
        "1",
        "--checkpoint.keep_every",
        "6",
        "--optim.lr",
        "1e-2",
    ]
    assert_ok(run_train([*TINY, *args, "--output_dir", str(out)]))
    root = out / "checkpoints"
    markers = {p.name: json.loads((p / MARKER).read_text()) for p in complete_checkpoints(root)}
    evals = {
        r["step"]: r["eval_loss"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "eval_loss" in r
    }
    best_step = min(evals, key=evals.get)
    expected = {f"step-{s:08d}" for s in {6, 12, best_step}}  # milestones 6 and 12, newest 12, best
    assert set(markers) == expected, (markers.keys(), evals)
    assert (root / "best").resolve().name == f"step-{best_step:08d}"
    for name, marker in markers.items():  # every kept checkpoint carries the eval of its step
        assert marker["eval"]["value"] == evals[marker["step"]], name


# ------------------------------------------------------------------------------------------------
# Corruption
# ------------------------------------------------------------------------------------------------


def test_truncated_file_is_detected_and_auto_falls_back(straight, tmp_path):
    run = resumable_copy(straight, tmp_path / "run", 8, 12)
    shard = run / "checkpoints" / "step-00000012" / "dcp" / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size // 2)
    proc = run_train([*TINY, *SHAPE, "--output_dir", str(run)])
    assert_ok(proc)
    assert f"file 'dcp/__0_0.distcp' is {size // 2} bytes, the marker says {size}" in proc.stdout
    assert "resuming from" in proc.stdout and "step-00000008" in proc.stdout
    assert (run / "checkpoints" / "corrupt-step-00000012").is_dir()  # set aside, not deleted
    assert verify(run / "checkpoints" / "step-00000012") is None  # written again, complete
    assert sorted(losses(run)) == [9, 10, 11, 12]
    assert all(losses(run)[s] == losses(straight)[s] for s in losses(run))
    assert same_weights(run, straight)


def test_missing_file_in_an_explicit_resume_is_one_line(straight, tmp_path):
    run = resumable_copy(straight, tmp_path / "run", 8)
    ckpt = run / "checkpoints" / "step-00000008"
    (ckpt / "scheduler.pt").unlink()
    proc = run_train(
        [*TINY, *SHAPE, "--output_dir", str(tmp_path / "other"), "--checkpoint.resume", str(ckpt)]
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"dtrain: error: --checkpoint.resume: checkpoint {ckpt} is corrupt: file 'scheduler.pt' is missing"
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "other" / "metrics.jsonl").exists()


def test_a_checkpoint_without_marker_does_not_count(tmp_path):
    """A run that died before its first commit (a renamed dir whose marker was never written, a temp
    dir) is restarted from step 0 by the same command; the leftovers are cleaned, never loaded."""
    run = tmp_path / "run"
    args = [*TINY, "--train.max_steps", "4", "--checkpoint.save_steps", "2", "--output_dir", str(run)]
    assert_ok(run_train(args))
    first = losses(run)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints" / "step-00000004" / "dcp").mkdir(parents=True)
    shutil.copytree(run / "final", run / "checkpoints" / ".tmp-step-00000002")
    proc = run_train(args)
    assert_ok(proc)
    assert "removing incomplete checkpoint" in proc.stdout and "resuming" not in proc.stdout
    assert not (run / "checkpoints" / ".tmp-step-00000002").exists()
    assert losses(run) == first  # a fresh start, logged once
    # another run's config in the same directory is still refused
    other = run_train([*args, "--train.seed", "3", "--checkpoint.resume", "never"])
    assert other.returncode == 2 and "holds an earlier run" in other.stderr


# ------------------------------------------------------------------------------------------------
# A save that fails: a real full disk (a small tmpfs mounted under the run)
# ------------------------------------------------------------------------------------------------


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(straight, tmp_path):
    ckpt_size = sum(
        f.stat().st_size for f in (straight / "checkpoints" / "step-00000012").rglob("*") if f.is_file()
    )
    run = tmp_path / "run"
    root = run / "checkpoints"
    # room for one checkpoint and a half: the first save fits, the second runs out of space
    if not mount_tmpfs(root, int(ckpt_size * 1.5 / 1024)):
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN; this machine does not allow it")
    try:
        proc = run_train([*TINY, *SHAPE, "--output_dir", str(run)])
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"dtrain: error: saving checkpoint {root / 'step-00000008'} failed")
        assert "disk full" in last and "step-00000004 is intact" in last
        assert "Traceback" not in proc.stderr
        assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]  # no temp dir, no step 8
        assert verify(root / "step-00000004") is None
        saved = tmp_path / "saved"
        shutil.copytree(root, saved, symlinks=True)
    finally:
        subprocess.run(["umount", str(root)], check=True)
    shutil.rmtree(root)
    shutil.copytree(saved, root, symlinks=True)
    proc = run_train([*TINY, *SHAPE, "--output_dir", str(run)])  # space again: resume and finish
    assert_ok(proc)
    assert "step-00000004 at step 4" in proc.stdout
    assert all(losses(run)[s] == losses(straight)[s] for s in range(5, 13))
    assert same_weights(run, straight)


def test_the_fix_of_a_failed_save_follows_its_cause(tmp_path):
    """A storage error keeps the disk advice; any other error (some state this version cannot save) does not
    send the user to free disk space."""
    from dtrain.checkpoint import STORAGE_FIX, _why

    cause, fix = _why(OSError(28, "No space left on device"), tmp_path, [])
    assert fix == STORAGE_FIX and "No space left" in cause
    cause, fix = _why(NotImplementedError("OptimState8bit: new_empty"), tmp_path, [])
    assert cause == "NotImplementedError: OptimState8bit: new_empty"
    assert "not a disk error" in fix and "disk space" not in fix


def test_unwritable_checkpoint_dir_fails_the_save_and_keeps_the_previous(straight, tmp_path):
    """Root ignores file modes, so the directory is made unwritable for real with a read-only bind mount."""
    run = resumable_copy(straight, tmp_path / "run", 8)
    root = run / "checkpoints"
    if subprocess.run(["mount", "--bind", str(root), str(root)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts need root with CAP_SYS_ADMIN; this machine does not allow it")
    try:
        assert (
            subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], capture_output=True).returncode == 0
        )
        proc = run_train([*TINY, *SHAPE, "--output_dir", str(run)])
    finally:
        subprocess.run(["umount", str(root)], check=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"dtrain: error: saving checkpoint {root / 'step-00000012'} failed: permission denied"
    )
    assert "the previous checkpoint step-00000008 is intact" in last
    assert (
        sorted(p.name for p in root.iterdir()) == ["step-00000008"] and verify(root / "step-00000008") is None
    )


# ------------------------------------------------------------------------------------------------
# Config continuity on resume
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (["--train.seed", "7", "--optim.lr", "5e-3"], ["optim.lr 0.01 -> 0.005", "train.seed 42 -> 7"]),
        (["--train.per_device_batch_size", "8"], ["global batch 4 -> 8"]),
        (["--train.max_steps", "10"], ["train.max_steps 12 -> 10"]),
        (["--model.hidden_size", "64"], ["model.hidden_size 32 -> 64"]),
    ],
)
def test_a_resume_that_changes_the_run_is_refused(straight, tmp_path, change, expected):
    run = resumable_copy(straight, tmp_path / "run", 8)
    before = sorted(p.name for p in run.rglob("*"))
    proc = run_train([*TINY, *SHAPE, *change, "--output_dir", str(run)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("dtrain: error: checkpoint step-00000008 was saved by a different run: ")
    assert all(e in line for e in expected), line
    assert "--checkpoint.allow_config_change" in line
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written, nothing removed


def test_allow_config_change_resumes_and_says_what_changed(straight, tmp_path):
    run = resumable_copy(straight, tmp_path / "run", 8)
    proc = run_train(
        [
            *TINY,
            *SHAPE,
            "--optim.lr",
            "5e-3",
            "--checkpoint.allow_config_change",
            "true",
            "--output_dir",
            str(run),
        ]
    )
    assert_ok(proc)
    assert "resuming with changed settings: optim.lr 0.01 -> 0.005" in proc.stdout
    resumed = json.loads((run / "run_info.json").read_text())["resumed_from"]  # recorded for reproduction
    assert resumed["step"] == 8 and "optim.lr 0.01 -> 0.005" in resumed["config_changes"]
    assert sorted(losses(run)) == [9, 10, 11, 12]


def test_harmless_changes_are_allowed_and_logged(straight, tmp_path):
    run = resumable_copy(straight, tmp_path / "run", 8)
    proc = run_train(
        [
            *TINY,
            *SHAPE,
            "--eval.steps",
            "5",
            "--train.max_steps",
            "14",
            "--log.every_steps",
            "2",
            "--output_dir",
            str(run),
        ]
    )
    assert_ok(proc)
    assert "eval.steps 6 -> 5" in proc.stdout and "train.max_steps 12 -> 14" in proc.stdout
    assert "log.every_steps 1 -> 2" in proc.stdout
    assert max(losses(run)) == 14
    assert losses(run)[10] == pytest.approx(losses(straight)[10], rel=0.05)  # same data, near-same schedule


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_default():
    """A checkpoint written by an older dtrain has no data.packing, train.compile or train.loss_chunk_size:
    left at their defaults they are what that run did; packing turned on changes the data order."""
    from dtrain.checkpoint import compare_configs
    from dtrain.config import Config

    older = Config().to_dict()
    for section, key in (("data", "packing"), ("train", "compile"), ("train", "loss_chunk_size")):
        del older[section][key]
    marker = {"global_batch": 32, "world_size": 1}
    assert compare_configs(older, marker, Config(), 1, "no") == ([], [])
    packed = Config()
    packed.data.packing, packed.train.compile = True, True
    breaking, harmless = compare_configs(older, marker, packed, 1, "no")
    assert breaking == ["data.packing None -> True"] and harmless == ["train.compile None -> True"]


def test_rng_file_loads_without_pickle_and_restores_every_generator(tmp_path):
    import random
    from types import SimpleNamespace

    import numpy as np

    from dtrain.checkpoint import CheckpointError, _rng_state, _set_rng_state

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # no pickle needed
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    # an older RNG file (numpy arrays pickled) is read only from the run's own checkpoints directory
    old = tmp_path / "elsewhere" / "rng.pt"
    old.parent.mkdir()
    torch.save({"numpy": np.random.get_state()}, old)
    with pytest.raises(CheckpointError, match="needs pickle to load"):
        Checkpointer._load_rng(SimpleNamespace(root=tmp_path / "run" / "checkpoints"), old)
    assert "numpy" in Checkpointer._load_rng(SimpleNamespace(root=tmp_path / "elsewhere"), old)


def _llama_dir(path: Path, hidden: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dtrain.tasks import build_char_tokenizer

    tok = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
    )
    if path.exists():
        shutil.rmtree(path)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_checkpoint_of_another_model_is_refused_before_it_is_read(tmp_path):
    """The directory behind --model.name_or_path now holds another model (same path, same config.yaml):
    the marker's model identity tells them apart before any weight is read."""
    model = _llama_dir(tmp_path / "model", hidden=32)
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": "Echo.", "input": w, "output": w}) + "\n"
            for w in ("apple", "pear", "plum", "fig", "lime", "kiwi") * 4
        )
    )
    run = tmp_path / "run"
    args = [
        "--model.name_or_path",
        str(model),
        "--data.path",
        str(data),
        "--data.template",
        "alpaca",
        "--output_dir",
        str(run),
        "--train.max_steps",
        "4",
        "--checkpoint.save_steps",
        "2",
        "--train.per_device_batch_size",
        "2",
        "--eval.num_generate",
        "0",
        "--log.progress_bar",
        "false",
        "--log.plots",  # the tests' recipes draw nothing (dtrain plot draws afterwards)
        "false",
    ]
    assert_ok(run_train([*args, "--train.max_steps", "2"]))  # stops at step 2 with a checkpoint
    marker = json.loads((run / "checkpoints" / "step-00000002" / "dtrain_checkpoint.json").read_text())
    assert marker["model"]["architecture"] == "LlamaForCausalLM" and marker["model"]["parameters"] > 0
    _llama_dir(model, hidden=48)  # replaced in place
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_train([*args, "--train.max_steps", "4", "--checkpoint.allow_config_change", "true"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "holds a LlamaForCausalLM with" in line and "--model.name_or_path" in line, line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing touched


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_in_process(tmp_path_factory):
    """A checkpoint written in this process by the real Checkpointer, with the live model to compare."""
    from dtrain.config import Config
    from dtrain.optim import build_optimizer, build_scheduler
    from dtrain.tasks import build_char_tokenizer

    cfg = Config(output_dir=str(tmp_path_factory.mktemp("inproc")))
    tok = build_char_tokenizer()
    acc = fresh_accelerator()
    model = tiny_llama(tok)
    optimizer = build_optimizer(model, cfg.optim, acc.device)
    scheduler = build_scheduler(optimizer, cfg.optim, 10)
    model, optimizer = acc.prepare(model, optimizer)
    ids = torch.randint(3, len(tok), (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    state = TrainState(step=1, samples_seen=2)
    ckpt = Checkpointer(acc, cfg, model, optimizer, scheduler, state, tok).save()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ckpt, weights


def test_export_equals_the_live_weights(saved_in_process, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, weights = saved_in_process
    out = tmp_path / "hf"
    proc = run_dtrain("export", str(ckpt), str(out))
    assert_ok(proc)
    exported = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in exported  # tied to the embedding: written once
    for key, value in exported.items():
        assert torch.equal(value, weights[key]), key
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"])
    assert AutoTokenizer.from_pretrained(out).chat_template is not None
    assert (out / "generation_config.json").is_file()


def test_export_shards_above_the_size_threshold_and_casts(saved_in_process, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt, weights = saved_in_process
    out = tmp_path / "hf"
    assert_ok(run_dtrain("export", str(ckpt), str(out), "--max-shard-size", "20KB", "--dtype", "bfloat16"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, weights[name].to(torch.bfloat16)), name


def test_export_never_overwrites_without_asking(saved_in_process, tmp_path):
    ckpt, _ = saved_in_process
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = run_dtrain("export", str(ckpt), str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        == f"dtrain: error: OUT_DIR {out} exists and is not empty; pass --overwrite or choose another directory"
    )
    assert (out / "notes.txt").read_text() == "keep me"
    assert_ok(run_dtrain("export", str(ckpt), str(out), "--overwrite"))
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()


def test_export_of_a_run_dir_and_of_best(straight, tmp_path):
    proc = run_dtrain("export", str(straight), str(tmp_path / "newest"))
    assert_ok(proc)
    assert "step-00000012" in proc.stdout
    assert "Writing model shards" not in proc.stderr, proc.stderr  # dtrain's own line says what it wrote
    newest = load_file(tmp_path / "newest" / "model.safetensors")
    final = load_file(straight / "final" / "model.safetensors")  # final/ is the same code on the same step
    assert all(torch.equal(newest[k], final[k]) for k in final)
    assert_ok(run_dtrain("export", str(straight / "checkpoints" / "best"), str(tmp_path / "best")))
    bad = run_dtrain("export", str(tmp_path / "nowhere"), str(tmp_path / "x"))
    assert bad.returncode == 2 and "is neither a complete dtrain checkpoint" in bad.stderr


# ------------------------------------------------------------------------------------------------
# SIGKILL at random moments, some of them in the middle of writing a checkpoint
# ------------------------------------------------------------------------------------------------

KILL_SHAPE = [
    *TINY,
    "--model.hidden_size",
    "128",
    "--model.intermediate_size",
    "256",  # ~4 MB checkpoints
    "--train.max_steps",
    "40",
    "--checkpoint.save_steps",
    "4",
    "--checkpoint.keep_last",
    "2",
    "--eval.steps",
    "0",
    "--eval.num_generate",
    "0",
]


def _committed(root: Path) -> list[int]:
    """Steps of the checkpoints a reader would trust: a step-* directory with its marker."""
    if not root.is_dir():
        return []
    return sorted(
        int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step-") and (p / MARKER).is_file()
    )


def _half_written(root: Path) -> bool:
    return root.is_dir() and any(
        p.name.startswith(".tmp-") or (p.name.startswith("step-") and not (p / MARKER).is_file())
        for p in root.iterdir()
    )


def _start(out: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen(
            [sys.executable, str(REPO / "dtrain" / "train.py"), *KILL_SHAPE, "--output_dir", str(out)],
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env_for_subprocess(PYTHONUNBUFFERED="1"),
        )


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 120.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(0.001)
    return False


def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    import random
    import time

    ref = tmp_path / "straight"
    assert_ok(run_train([*KILL_SHAPE, "--output_dir", str(ref)]))
    out, root = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    rng = random.Random(1234)

    def mid_save():  # a temp dir appears: the save has begun
        return root.is_dir() and any(p.name.startswith(".tmp-") for p in root.iterdir())

    def some_steps(n):
        return lambda: (
            (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= n
        )

    def after(seconds):
        start = time.monotonic()
        return lambda: time.monotonic() - start >= seconds

    triggers = [mid_save, some_steps(rng.randint(6, 14)), mid_save, after(rng.uniform(1.0, 4.0)), mid_save]
    mid_write_kills, expected_start = 0, 0
    # the newest complete checkpoint
    for i, trigger in enumerate(triggers):
        log = tmp_path / f"attempt{i}.log"
        proc = _start(out, log)
        fired = _wait_for(proc, trigger)
        proc.kill()
        proc.wait()
        text = log.read_text()
        assert fired, f"attempt {i}: the run ended before its kill\n{text[-2000:]}"
        if expected_start and "global batch" in text:  # a restart that got past startup continues from
            assert f"step-{expected_start:08d} at step {expected_start}" in text, (
                i,
                expected_start,
                text[-2000:],
            )
        mid_write_kills += _half_written(root)
        committed = _committed(root)
        expected_start = committed[-1] if committed else 0
    assert mid_write_kills >= 1, "no kill landed inside a checkpoint write"
    last = tmp_path / "last.log"
    proc = _start(out, last)
    assert proc.wait(timeout=600) == 0, last.read_text()[-3000:]
    assert f"step-{expected_start:08d} at step {expected_start}" in last.read_text()
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 41))  # every step logged once, torn lines dropped
    assert all(a["loss"] == b["loss"] for a, b in zip(rows, train_rows(ref), strict=True))
    assert same_weights(out, ref)

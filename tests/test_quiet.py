"""dtrain.quiet: a run's screen is dtrain's own. Library noise is dropped where it is logged, a library's
message about the user's run still shows, other ranks print only errors, and an error is said once."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

from conftest import REPO, TINY, assert_ok, env_for_subprocess, run_train

from dtrain import quiet

# what dtrain's filters drop (dtrain/quiet.py NOISE, and datasets' bars while a local file is read)
NOISE_MARKS = (
    "_pytree.py",
    "Enum subclass",
    "Generating train split",
    "Failed to load",
    "Setting accelerator",
)


def assert_first_screen_is_dtrains(proc: subprocess.CompletedProcess) -> None:
    """No line of the library noise dtrain filters, on either stream (DeepSpeed logs to stdout)."""
    for line in (proc.stdout + proc.stderr).splitlines():
        assert not any(mark in line for mark in NOISE_MARKS), line


def test_a_run_shows_a_library_warning_about_it_and_none_of_the_noise(tmp_path, tiny_model_dir):
    """A model directory whose checkpoint lacks a weight: transformers' load report (the weight is newly
    initialised) is about this run and must reach the user; the import-time noise must not."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = load_file(model / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"hello world {i} " * 3}) + "\n" for i in range(40)))
    args = [*TINY, "--model.name_or_path", str(model), "--data.path", str(data), "--data.template", "text"]
    proc = run_train(
        [*args, "--train.max_steps", "1", "--output_dir", str(tmp_path / "o")], PYTHONWARNINGS=""
    )
    assert_ok(proc)
    assert "model.norm.weight" in proc.stderr and "MISSING" in proc.stderr
    assert_first_screen_is_dtrains(proc)
    assert "single process on cpu, fp32" in proc.stdout


def test_each_filter_drops_one_message_of_one_logger(monkeypatch):
    monkeypatch.delenv("DTRAIN_VERBOSE", raising=False)
    monkeypatch.setattr(quiet.install, "done", False, raising=False)
    quiet.install()
    kept: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            kept.append(record.getMessage())

    log = logging.getLogger("torch.utils._pytree")
    handler = Keep()
    log.addHandler(handler)
    try:
        log.warning("%s is an Enum subclass and is now natively supported by torch.compile", "E")
        log.warning("something else from torch's pytree")
    finally:
        log.removeHandler(handler)
    assert kept == ["something else from torch's pytree"]


def _child(code: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        env=env_for_subprocess(**env),
    )


MESSAGE = "'dtrain: error: --data.path: no such file'"
ERROR = f"from dtrain.quiet import error_once; error_once({MESSAGE})"


def test_an_error_is_said_by_rank_zero_and_held_back_by_the_others():
    """Rank 0 prints at once. Rank 1 holds the same line back; the launcher's SIGTERM (sent once rank 0
    has exited) ends it silently, even with dtrain's stop handlers installed for that signal."""
    started = time.time()
    zero = _child(ERROR, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")
    assert zero.wait(timeout=30) == 0 and "no such file" in zero.stderr.read()
    assert time.time() - started < quiet.ERROR_GRACE_S["node_main"]
    handled = "import signal; signal.signal(signal.SIGTERM, lambda *a: None); " + ERROR
    one = _child(handled, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2")
    time.sleep(1.5)
    one.send_signal(signal.SIGTERM)
    assert one.wait(timeout=30) == -signal.SIGTERM and one.stderr.read() == ""


def test_an_error_only_another_rank_finds_is_still_printed():
    """Rank 2 (the first of the second node) finds it alone: nobody stops it, so after its wait it prints."""
    code = f"import dtrain.quiet as q; q.ERROR_GRACE_S['node_main'] = 0.2; q.error_once({MESSAGE})"
    two = _child(code, RANK="2", LOCAL_RANK="0", WORLD_SIZE="4")
    assert two.wait(timeout=30) == 0 and "no such file" in two.stderr.read()


def test_verbose_turns_every_filter_off(monkeypatch):
    monkeypatch.setenv("DTRAIN_VERBOSE", "1")
    monkeypatch.setattr(quiet.install, "done", False, raising=False)
    before = list(logging.getLogger("torchao").filters)
    quiet.install()
    assert logging.getLogger("torchao").filters == before

"""Bad input ends with one line naming the problem and the fix: exit 2, no traceback, nothing lost."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import TINY, assert_ok, run_train


def _fails(proc, *needles: str) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_data_file(tmp_path, tiny_model_dir):
    proc = run_train(
        [
            "--output_dir",
            str(tmp_path / "o"),
            "--model.name_or_path",
            str(tiny_model_dir),
            "--data.path",
            str(tmp_path / "missing.jsonl"),
        ]
    )
    _fails(proc, "--data.path", "missing.jsonl", "does not exist")


def _run_on_local_model(tmp_path: Path, model_dir: Path, data: Path, *extra: str):
    return run_train(["--output_dir", str(tmp_path / "o"), "--model.name_or_path", str(model_dir),
                      "--data.path", str(data), *extra])  # fmt: skip


def test_dataset_without_template_columns(tmp_path, tiny_model_dir):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}] * 4)
    proc = _run_on_local_model(tmp_path, tiny_model_dir, data, "--data.template", "alpaca")
    _fails(proc, "--data.path", "'instruction'", "'output'", "alpaca", "question")


def test_empty_dataset(tmp_path, tiny_model_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    proc = _run_on_local_model(tmp_path, tiny_model_dir, data)
    _fails(proc, "--data.path", "no rows")


def test_model_path_does_not_exist(tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}] * 4)
    proc = run_train(
        [
            "--output_dir",
            str(tmp_path / "o"),
            "--model.name_or_path",
            str(tmp_path / "no-model"),
            "--data.path",
            str(data),
            "--data.template",
            "text",
        ]
    )
    _fails(proc, "--model.name_or_path", "does not exist")


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--train.per_device_batch_size", "0"),
        ("--train.per_device_batch_size", "-4"),
        ("--train.max_steps", "0"),
        ("--train.gradient_accumulation_steps", "-1"),
    ],
)
def test_non_positive_sizes(tmp_path, flag, value):
    proc = run_train(["--output_dir", str(tmp_path / "o"), flag, value])
    _fails(proc, flag, "must be > 0")
    assert not (tmp_path / "o").exists()  # nothing was created before the config was checked


def test_unknown_key_names_the_closest(tmp_path):
    proc = run_train(["--output_dir", str(tmp_path / "o"), "--train.max_stepz", "5"])
    _fails(proc, "train.max_stepz", "did you mean 'train.max_steps'")


def test_fp16_on_cpu_is_refused(tmp_path):
    proc = run_train(["--output_dir", str(tmp_path / "o"), "--train.mixed_precision", "fp16"])
    _fails(proc, "fp16", "bf16")


def test_earlier_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    args = [
        *TINY,
        "--output_dir",
        str(out),
        "--train.max_steps",
        "2",
        "--eval.steps",
        "0",
        "--checkpoint.save_steps",
        "0",
    ]
    assert_ok(run_train(args))
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    proc = run_train([*args, "--checkpoint.resume", "never"])
    _fails(proc, "--output_dir", "earlier run", "--overwrite_output_dir")
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()} == digest
    # with the explicit flag it starts over
    proc = run_train(
        [*args, "--checkpoint.resume", "never", "--overwrite_output_dir", "true", "--train.max_steps", "3"]
    )
    assert_ok(proc)
    assert [
        json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ] == [1, 2, 3]


def test_tracker_that_is_not_installed(tmp_path):
    import importlib.util

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    proc = run_train(["--output_dir", str(tmp_path / "o"), "--log.report_to", "mlflow"])
    _fails(proc, "--log.report_to mlflow", "pip install")

"""Bad input ends with one line naming the problem and the fix: exit 2, no traceback, nothing lost.

`TABLE` below is the bad-input table: case id -> builder -> the words its one error line must hold. Every
case runs the real script (or the real launcher) in a subprocess. Unless it is about --output_dir itself,
a case runs against a real completed run with `--overwrite_output_dir true`, the most destructive
setting, and every file of that run must be byte-identical afterwards (and nothing of the case may be
left running).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, TINY, TRAIN, assert_ok, env_for_subprocess, run_train


@dataclass
class Case:
    args: list[str]  # dtrain/train.py arguments
    cmd: list[str] | None = None  # another command that runs the script (a launcher); args go after it
    prefix: str = "dtrain: error:"
    code: int = 2
    guard: bool = True  # run against the earlier run: --output_dir RUN --overwrite_output_dir true
    env: dict[str, str] | None = None


@dataclass
class Ctx:
    tmp: Path  # this case's own directory
    model: Path  # a tiny local HF model directory (char tokenizer with a chat template)
    run: Path  # the earlier, completed run

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def jsonl(self, name: str, rows: list) -> Path:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows))

    def on_model(self, data: Path, *extra: str, model: Path | None = None) -> Case:
        return Case(["--model.name_or_path", str(model or self.model), "--data.path", str(data), *extra])

    def model_copy(self, name: str) -> Path:
        return Path(shutil.copytree(self.model, self.tmp / name))

    def llama(self, name: str, **config) -> Path:
        """A tiny Llama saved with the char tokenizer, with config overrides (vocab, positions)."""
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(self.model)
        shape = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        LlamaForCausalLM(LlamaConfig(**{"vocab_size": len(tok), **shape, **config})).save_pretrained(
            self.tmp / name
        )
        tok.save_pretrained(self.tmp / name)
        return self.tmp / name


CHAT = {"messages": [{"role": "user", "content": "Reverse: abcd"}, {"role": "assistant", "content": "dcba"}]}
ALPACA = {"instruction": "Reverse:", "input": "abcd", "output": "dcba"}


def flags(*args: str) -> Callable[[Ctx], Case]:
    return lambda c: Case(list(args))


# --------------------------------------------------------------------------------------------
# Builders: each writes its bad input under c.tmp and returns the command.
# --------------------------------------------------------------------------------------------


def recipe(text: str, name: str = "recipe.yaml") -> Callable[[Ctx], Case]:
    return lambda c: Case(["--config", str(c.file(name, text))])


def output_dir_is_a_file(c: Ctx) -> Case:
    return Case(["--output_dir", str(c.file("taken", "not a directory\n"))], guard=False)


def text_data_on_model(rows: list, *extra: str, name: str = "d.jsonl") -> Callable[[Ctx], Case]:
    return lambda c: c.on_model(c.jsonl(name, rows), "--data.template", "text", *extra)


def data_file(name: str, content: str | bytes, *extra: str) -> Callable[[Ctx], Case]:
    return lambda c: c.on_model(c.file(name, content), "--data.template", "text", *extra)


def chat_rows(rows: list, *extra: str) -> Callable[[Ctx], Case]:
    return lambda c: c.on_model(c.jsonl("chat.jsonl", rows), *extra)


def empty_data_dir(c: Ctx) -> Case:
    (c.tmp / "nodata").mkdir()
    return c.on_model(c.tmp / "nodata", "--data.template", "text")


def split_missing(c: Ctx) -> Case:
    (c.tmp / "splits").mkdir()
    c.jsonl("splits/train.jsonl", [CHAT] * 8)
    return c.on_model(c.tmp / "splits", "--data.split", "validation")


def saved_split_missing(c: Ctx) -> Case:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([CHAT] * 4)}).save_to_disk(c.tmp / "saved")
    return c.on_model(c.tmp / "saved", "--data.split", "validation")


def model_dir_without_config(c: Ctx) -> Case:
    model = c.model_copy("no-config")
    (model / "config.json").unlink()
    return c.on_model(c.jsonl("chat.jsonl", [CHAT] * 8), model=model)


def model_weights_truncated(c: Ctx) -> Case:
    model = c.model_copy("truncated")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return c.on_model(c.jsonl("chat.jsonl", [CHAT] * 8), model=model)


def tokenizer_without_chat_template(c: Ctx) -> Case:
    model = c.model_copy("base-model")
    (model / "chat_template.jinja").unlink()
    return c.on_model(c.jsonl("chat.jsonl", [CHAT] * 8), model=model)


def chat_template_that_fails(c: Ctx) -> Case:
    template = c.file("broken.jinja", "{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}")
    return c.on_model(c.jsonl("chat.jsonl", [CHAT] * 8), "--data.chat_template", str(template))


def tokenizer_larger_than_embedding(c: Ctx) -> Case:
    from transformers import AutoTokenizer

    small = c.llama("small-vocab", vocab_size=len(AutoTokenizer.from_pretrained(c.model)) - 8)
    return c.on_model(c.jsonl("chat.jsonl", [CHAT] * 8), "--model.tokenizer", str(c.model), model=small)


def max_length_over_positions(c: Ctx) -> Case:
    short = c.llama("short", max_position_embeddings=32)
    long_chat = {
        "messages": [
            {"role": "user", "content": "Reverse: " + "abcd" * 15},
            {"role": "assistant", "content": "dcba"},
        ]
    }
    return c.on_model(c.jsonl("chat.jsonl", [long_chat] * 8), "--data.max_length", "128", model=short)


def resume_from_run_dir_without_checkpoint(c: Ctx) -> Case:
    other = c.tmp / "other-run"
    (other / "checkpoints").mkdir(parents=True)
    shutil.copy(c.run / "config.yaml", other / "config.yaml")
    return Case([*TINY, "--checkpoint.resume", str(other)])


def tracker_not_installed(c: Ctx) -> Case:
    import importlib.util

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    return Case(["--log.report_to", "mlflow"])


def accelerate_launch_without_multi_gpu(c: Ctx) -> Case:
    """`accelerate launch --num_processes 2` on CPU without --multi_gpu starts ONE process. --quiet keeps the
    launcher's own CalledProcessError traceback out; the launcher exits 1 whatever the script's code. GPUs
    are hidden so the CPU message is expected on any machine."""
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--quiet",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(TRAIN),
    ]
    return Case(TINY, cmd=launcher, code=1, env={"CUDA_VISIBLE_DEVICES": ""})


def dtrain_launch_deepspeed_json_contradicts_flags(c: Ctx) -> Case:
    import yaml

    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 4
    c.file("zero2.json", json.dumps(ds))
    profile = yaml.safe_load((REPO / "accelerate_configs" / "zero2.yaml").read_text())
    profile["deepspeed_config"]["deepspeed_config_file"] = str(c.tmp / "zero2.json")
    c.file("my_zero2.yaml", yaml.safe_dump(profile))
    launcher = [
        sys.executable,
        "-m",
        "dtrain.cli",
        "launch",
        str(c.tmp / "my_zero2.yaml"),
        "--cpu",
        "--gpus",
        "2",
        "--dry-run",
        "--",
    ]
    return Case(["--train.per_device_batch_size", "8"], cmd=launcher, prefix="dtrain launch: error:")


# --------------------------------------------------------------------------------------------
# The table: case id, builder, words the error line must hold (the flag or file, and the fix).
# --------------------------------------------------------------------------------------------

TABLE: list[tuple[str, Callable[[Ctx], Case], list[str]]] = [
    # the recipe (--config FILE): named with the line
    (
        "recipe_does_not_parse",
        recipe("train:\n  max_steps: [5\n", "bad.yaml"),
        ["--config", "bad.yaml line 2", "not valid YAML", "fix the syntax"],
    ),
    (
        "recipe_top_level_not_a_mapping",
        recipe("- train\n- data\n", "list.yaml"),
        ["--config", "list.yaml", "top level is a list", "not a mapping"],
    ),
    (
        "recipe_key_given_twice",
        recipe("train:\n  max_steps: 5\n  max_steps: 50\n", "dup.yaml"),
        ["--config", "dup.yaml", "'train.max_steps'", "twice", "lines 2 and 3", "delete one"],
    ),
    (
        "recipe_section_not_a_mapping",
        recipe("train: 5\n", "flat.yaml"),
        ["--config", "flat.yaml line 1", "section 'train'", "indented"],
    ),
    (
        "recipe_unknown_key",
        recipe("optim:\n  lr: 0.1\ntrain:\n  max_stepz: 5\n", "typo.yaml"),
        ["--config", "typo.yaml line 4", "train.max_stepz", "did you mean 'train.max_steps'"],
    ),
    (
        "recipe_missing",
        lambda c: Case(["--config", str(c.tmp / "nope.yaml")]),
        ["--config", "nope.yaml", "does not exist"],
    ),
    # flags
    ("unknown_flag", flags("--train.max_stepz", "5"), ["train.max_stepz", "did you mean 'train.max_steps'"]),
    ("wrong_type", flags("--train.max_steps", "abc"), ["--train.max_steps", "'abc'", "expected an integer"]),
    ("bad_choice", flags("--optim.name", "adamw9"), ["--optim.name", "'adamw9'", "expected one of adamw,"]),
    (
        "batch_size_zero",
        flags("--train.per_device_batch_size", "0"),
        ["--train.per_device_batch_size", "must be > 0"],
    ),
    (
        "batch_size_negative",
        flags("--train.per_device_batch_size", "-4"),
        ["--train.per_device_batch_size", "must be > 0"],
    ),
    ("max_steps_zero", flags("--train.max_steps", "0"), ["--train.max_steps", "must be > 0"]),
    (
        "accumulation_negative",
        flags("--train.gradient_accumulation_steps", "-1"),
        ["--train.gradient_accumulation_steps", "must be > 0"],
    ),
    (
        "exact_match_with_text_template",
        text_data_on_model([{"text": "hello"}] * 4, "--eval.metric", "exact_match"),
        ["--eval.metric exact_match", "--eval.metric loss"],
    ),
    ("fp16_on_cpu", flags("--train.mixed_precision", "fp16"), ["--train.mixed_precision fp16", "bf16"]),
    ("tracker_not_installed", tracker_not_installed, ["--log.report_to mlflow", "pip install"]),
    (
        "output_dir_is_a_file",
        output_dir_is_a_file,
        ["--output_dir", "taken", "existing file", "choose another"],
    ),
    (
        "resume_from_run_dir_without_checkpoint",
        resume_from_run_dir_without_checkpoint,
        [
            "--checkpoint.resume",
            "run directory",
            "no complete checkpoint",
            "--checkpoint.resume auto",
            "--output_dir",
        ],
    ),
    # paths
    (
        "data_file_missing",
        lambda c: c.on_model(c.tmp / "missing.jsonl"),
        ["--data.path", "missing.jsonl", "does not exist"],
    ),
    ("data_file_unsupported_suffix", data_file("notes.txt", "hello\n"), ["--data.path", ".txt", ".jsonl"]),
    ("data_dir_without_data", empty_data_dir, ["--data.path", "nodata", "holds no data files"]),
    (
        "data_split_missing",
        split_missing,
        ["--data.path", "no split 'validation'", "has: train", "--data.split"],
    ),
    (
        "data_saved_split_missing",
        saved_split_missing,
        ["--data.path", "saved", "no split 'validation'", "has: train", "--data.split"],
    ),
    (
        "model_path_missing",
        lambda c: c.on_model(c.jsonl("d.jsonl", [CHAT]), model=c.tmp / "no-model"),
        ["--model.name_or_path", "no-model", "does not exist"],
    ),
    (
        "model_dir_without_config",
        model_dir_without_config,
        ["--model.name_or_path", "no-config", "no config.json"],
    ),
    ("model_weights_truncated", model_weights_truncated, ["--model.name_or_path", "model.safetensors"]),
    (
        "tokenizer_missing",
        lambda c: Case(["--model.tokenizer", str(c.tmp / "no-tok")]),
        ["--model.tokenizer", "no-tok", "does not exist"],
    ),
    (
        "tokenizer_larger_than_embedding",
        tokenizer_larger_than_embedding,
        ["--model.tokenizer", "--model.resize_embeddings"],
    ),
    (
        "max_length_over_positions",
        max_length_over_positions,
        ["--data.max_length", "max_position_embeddings"],
    ),
    # data files that do not parse: the file and the line
    (
        "data_not_utf8",
        data_file("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
        ["--data.path", "latin1.jsonl", "line 2", "UTF-8"],
    ),
    (
        "data_bad_json_line",
        data_file("broken.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n'),
        ["--data.path", "broken.jsonl", "line 3", "not valid JSON", "one JSON object"],
    ),
    (
        "data_json_single_object",
        data_file("wrapped.json", json.dumps({"data": [{"text": "a"}] * 3}, indent=2)),
        ["--data.path", "wrapped.json", "one JSON object", "'data'", "JSON Lines"],
    ),
    (
        "data_csv_ragged",
        data_file("ragged.csv", "text,label\na,1\nb,2,3\nc,4\n"),
        ["--data.path", "ragged.csv", "line 3", "3 fields", "header has 2", "quote"],
    ),
    (
        "data_parquet_corrupt",
        data_file("broken.parquet", b"PAR1 not really parquet PAR1"),
        ["--data.path", "broken.parquet", "not a readable parquet file"],
    ),
    ("data_empty", data_file("empty.jsonl", ""), ["--data.path", "no rows"]),
    # data that parses but cannot train
    (
        "data_lacks_template_columns",
        lambda c: c.on_model(
            c.jsonl("qa.jsonl", [{"question": "a", "answer": "b"}] * 4), "--data.template", "alpaca"
        ),
        ["--data.path", "'instruction'", "'output'", "alpaca", "question"],
    ),
    (
        "data_numbers_where_text_is_read",
        text_data_on_model([{"text": n} for n in range(8)], name="numbers.jsonl"),
        ["--data.path", "column 'text'", "numbers.jsonl", "numbers"],
    ),
    (
        "data_mixed_types",
        text_data_on_model([{"text": 5}, {"text": "five"}], name="mixed.jsonl"),
        ["--data.path", "mixed.jsonl", "column 'text'", "line 1", "line 2", "same type"],
    ),
    (
        "data_text_all_empty",
        text_data_on_model([{"text": ""}, {"text": "  "}] * 4, name="blank.jsonl"),
        ["--data.path", "column 'text'", "blank.jsonl", "empty in all 8 rows"],
    ),
    (
        "chat_messages_not_role_content",
        chat_rows([{"messages": ["hi", "hello"]}] * 4),
        ["--data.path", "column 'messages'", "lists of strings", "{role, content}"],
    ),
    (
        "chat_sharegpt_roles",
        chat_rows([{"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]}] * 4),
        ["--data.path", "column 'messages'", "'human'", "rename human -> user, gpt -> assistant"],
    ),
    (
        "chat_without_assistant_turn",
        chat_rows([{"messages": [{"role": "user", "content": "hi"}]}] * 4),
        ["--data.path", "chat.jsonl", "no row", "assistant message"],
    ),
    (
        "chat_tokenizer_without_template",
        tokenizer_without_chat_template,
        ["no chat template", "--data.template alpaca", "--data.chat_template"],
    ),
    (
        "chat_template_file_missing",
        lambda c: Case(["--data.chat_template", str(c.tmp / "none.jinja")]),
        ["--data.chat_template", "none.jinja", "does not exist"],
    ),
    (
        "chat_template_fails_to_render",
        chat_template_that_fails,
        ["--data.chat_template", "broken.jinja", "fails to render", "no_such_filter"],
    ),
    (
        "max_length_keeps_no_target",
        lambda c: c.on_model(
            c.jsonl("alpaca.jsonl", [ALPACA] * 8), "--data.template", "alpaca", "--data.max_length", "1"
        ),
        ["--data.max_length"],
    ),
    # launchers
    (
        "accelerate_launch_without_multi_gpu",
        accelerate_launch_without_multi_gpu,
        [
            "asked for 2 processes",
            "started one",
            "dtrain launch ddp --cpu --gpus 2",
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2",
        ],
    ),
    (
        "dtrain_launch_deepspeed_json_contradicts_flags",
        dtrain_launch_deepspeed_json_contradicts_flags,
        ["zero2.json", "train_micro_batch_size_per_gpu=4", "--train.per_device_batch_size is 8", '"auto"'],
    ),
]


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@dataclass
class EarlierRun:
    path: Path
    pristine: Path  # a copy, to restore the run after a case damaged it (so each case is judged alone)
    digest: dict[str, str]


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory) -> EarlierRun:
    """A real completed run (smoke recipe, 2 steps): checkpoint, final model, metrics, config."""
    root = tmp_path_factory.mktemp("earlier")
    run = root / "run"
    assert_ok(
        run_train(
            [
                *TINY,
                "--output_dir",
                str(run),
                "--train.max_steps",
                "2",
                "--eval.steps",
                "0",
                "--checkpoint.save_steps",
                "0",
            ]
        )
    )
    assert (run / "final" / "config.json").is_file() and (run / "config.yaml").is_file()
    shutil.copytree(run, root / "pristine", symlinks=True)
    return EarlierRun(run, root / "pristine", _digest(run))


def _running_with(marker: str) -> list[str]:
    """Command lines of live processes (other than this one) that mention `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


@pytest.mark.parametrize(("builder", "needles"), [pytest.param(b, n, id=i) for i, b, n in TABLE])
def test_bad_input(builder, needles, tmp_path, tiny_model_dir, earlier_run):
    case = builder(Ctx(tmp_path, tiny_model_dir, earlier_run.path))
    guard = ["--output_dir", str(earlier_run.path), "--overwrite_output_dir", "true"] if case.guard else []
    cmd = case.cmd or [sys.executable, str(TRAIN)]
    proc = subprocess.run(
        [*cmd, *case.args, *guard],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env_for_subprocess(**(case.env or {})),
    )
    time.sleep(0.05)
    leftovers = _running_with(str(tmp_path)) + (_running_with(str(earlier_run.path)) if case.guard else [])
    changed = None
    if case.guard:
        after = _digest(earlier_run.path)
        if after != earlier_run.digest:
            before = earlier_run.digest
            changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            shutil.rmtree(earlier_run.path)
            shutil.copytree(earlier_run.pristine, earlier_run.path, symlinks=True)
    assert proc.returncode == case.code, (
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(case.prefix)]
    assert len(errors) == 1, proc.stderr[-3000:]
    missing = [n for n in needles if n not in errors[0]]
    assert not missing, f"{missing} not in: {errors[0]}"
    assert not leftovers, leftovers
    assert changed is None, (
        f"the earlier run was changed ({len(changed)} files, e.g. {changed[:5]}): {errors[0]}"
    )


def test_the_table_is_large_and_unique():
    ids = [case_id for case_id, _, _ in TABLE]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)


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
    digest = _digest(out)
    proc = run_train([*args, "--checkpoint.resume", "never"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert len(errors) == 1 and all(
        w in errors[0] for w in ("--output_dir", "earlier run", "--overwrite_output_dir")
    )
    assert _digest(out) == digest
    # with the explicit flag it starts over
    proc = run_train(
        [*args, "--checkpoint.resume", "never", "--overwrite_output_dir", "true", "--train.max_steps", "3"]
    )
    assert_ok(proc)
    assert [
        json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ] == [1, 2, 3]

"""dtrain.config: parsing (CLI + YAML), error messages, cross-field validation, YAML round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dtrain.config import Config, ConfigError, UserError, all_keys, load_config_file, parse_config


def parse_error(argv: list[str]) -> str:
    """The ConfigError message parse_config raises for argv (the test fails if it parses)."""
    with pytest.raises(ConfigError) as info:
        parse_config(argv)
    message = str(info.value)
    assert "\n" not in message, f"error message is not one line: {message!r}"
    assert message.strip(), "empty error message"
    return message


def write_yaml(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def test_defaults_parse_to_the_dataclass_defaults():
    cfg = parse_config([])
    assert isinstance(cfg, Config)
    assert cfg.to_dict() == Config().to_dict()
    assert cfg.optim.name == "adamw"
    assert cfg.data.synthetic_tasks == ["reverse", "sort", "add", "upper"]


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)


@pytest.mark.parametrize("argv", [["--train.max_steps", "50"], ["--train.max_steps=50"]])
def test_override_with_space_or_equals(argv):
    cfg = parse_config(argv)
    assert cfg.train.max_steps == 50
    assert isinstance(cfg.train.max_steps, int)
    # nothing else moved
    expected = Config().to_dict()
    expected["train"]["max_steps"] = 50
    assert cfg.to_dict() == expected


def test_overrides_are_typed():
    cfg = parse_config(
        [
            "--optim.lr=1e-4",
            "--log.progress_bar",
            "false",
            "--data.synthetic_tasks",
            "[add, copy]",
            "--train.num_epochs",
            "1.5",
            "--train.max_steps",
            "null",
        ]
    )
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.log.progress_bar is False
    assert cfg.data.synthetic_tasks == ["add", "copy"]
    assert cfg.train.max_steps is None
    assert cfg.train.num_epochs == pytest.approx(1.5)


def test_yaml_config_file_with_cli_override(tmp_path):
    recipe = write_yaml(
        tmp_path / "recipe.yaml",
        {"train": {"max_steps": 5, "seed": 3}, "optim": {"lr": 0.01, "scheduler": "wsd"}},
    )
    cfg = parse_config(["--config", str(recipe), "--train.max_steps", "9"])
    assert cfg.train.max_steps == 9  # the CLI wins
    assert cfg.train.seed == 3  # the file's other values stay
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.optim.scheduler == "wsd"
    assert cfg.train.per_device_batch_size == 32  # untouched default


def test_yaml_config_file_alone(tmp_path):
    recipe = write_yaml(tmp_path / "r.yaml", "optim:\n  lr: 1e-3\neval:\n  metric: exact_match\n")
    cfg = parse_config(["--config", str(recipe)])
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.eval.metric == "exact_match"


# --------------------------------------------------------------------------------------------
# Unknown keys: the message names the closest valid key
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["--train.max_stepz", "5"], ["--train.max_stepz=5"], ["--trian.max_steps", "5"]],
)
def test_unknown_cli_key_names_closest_key(argv):
    message = parse_error(argv)
    assert "train.max_steps" in message
    assert "max_stepz" in message or "trian" in message  # it also names what was given


def test_unknown_top_level_cli_key_names_closest_key():
    message = parse_error(["--output_dirr", "x"])
    assert "'output_dir'" in message


def test_unknown_key_in_yaml_names_closest_key(tmp_path):
    recipe = write_yaml(tmp_path / "r.yaml", {"train": {"max_stepz": 5}})
    message = parse_error(["--config", str(recipe)])
    assert "train.max_steps" in message
    assert "max_stepz" in message


def test_misspelt_section_in_yaml_names_closest_key(tmp_path):
    recipe = write_yaml(tmp_path / "r.yaml", "trian:\n  max_steps: 5\n")
    message = parse_error(["--config", str(recipe)])
    assert "train.max_steps" in message
    assert "trian" in message


@pytest.mark.parametrize(
    ("argv", "closest"),
    [
        (["--optim.warmup_stepz", "1"], "optim.warmup_steps"),
        (["--evall.steps", "3"], "eval.steps"),
        (["--xyz.keep_last", "3"], "checkpoint.keep_last"),
        (["--qqqqqqqqqqqqqqqqqq.seed", "3"], "train.seed"),  # nothing close: matched on the field name
    ],
)
def test_suggestion_is_a_valid_key(argv, closest):
    message = parse_error(argv)
    assert f"did you mean '{closest}'" in message
    assert closest in all_keys()


def test_unknown_section_lists_valid_sections():
    message = parse_error(["--foo.bar", "1"])
    assert "foo.bar" in message
    for section in ("model", "peft", "data", "train", "optim", "eval", "checkpoint", "log"):
        assert section in message


# --------------------------------------------------------------------------------------------
# Bad values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--train.max_steps", "abc"], ["--train.max_steps=abc"]])
def test_wrong_type_names_the_key(argv):
    message = parse_error(argv)
    assert "train.max_steps" in message
    assert "abc" in message


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    recipe = write_yaml(tmp_path / "r.yaml", "train:\n  max_steps: abc\n")
    assert "train.max_steps" in parse_error(["--config", str(recipe)])


def test_invalid_literal_fails_and_names_the_key():
    message = parse_error(["--optim.name", "lion"])
    assert "optim.name" in message
    assert "lion" in message


def test_invalid_literal_in_yaml_fails(tmp_path):
    recipe = write_yaml(tmp_path / "r.yaml", {"optim": {"scheduler": "wsdd"}})
    assert "optim.scheduler" in parse_error(["--config", str(recipe)])


def test_all_cross_field_problems_in_one_message():
    message = parse_error(
        ["--train.per_device_batch_size", "0", "--train.max_steps", "-1", "--optim.warmup_steps", "5"]
    )
    assert message.startswith("invalid config")
    assert "train.per_device_batch_size" in message
    assert "--train.max_steps must be > 0" in message
    assert "optim.warmup_steps" in message


def test_warmup_steps_must_be_below_max_steps():
    message = parse_error(["--train.max_steps", "10", "--optim.warmup_steps", "10"])
    assert "optim.warmup_steps" in message and "train.max_steps" in message
    assert parse_config(["--train.max_steps", "10", "--optim.warmup_steps", "9"]).optim.warmup_steps == 9


def test_several_range_problems_reported_together():
    message = parse_error(
        [
            "--optim.lr",
            "-1",
            "--optim.warmup_ratio",
            "1.5",
            "--model.hidden_size",
            "30",
            "--model.num_heads",
            "4",
        ]
    )
    for key in ("optim.lr", "optim.warmup_ratio", "model.hidden_size"):
        assert key in message


def test_max_steps_and_num_epochs_are_exclusive():
    assert "train.num_epochs" in parse_error(["--train.max_steps", "5", "--train.num_epochs", "1"])
    assert "train.num_epochs" in parse_error(["--train.max_steps", "null"])
    cfg = parse_config(["--train.max_steps", "null", "--train.num_epochs", "2"])
    assert cfg.train.max_steps is None and cfg.train.num_epochs == 2


def test_unknown_synthetic_task_is_rejected():
    message = parse_error(["--data.synthetic_tasks", "[reverse, foo]"])
    assert "foo" in message and "data.synthetic_tasks" in message


def test_text_template_with_exact_match_is_rejected(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    message = parse_error(
        ["--data.path", str(data), "--data.template", "text", "--eval.metric", "exact_match"]
    )
    assert "eval.metric" in message


def test_missing_local_data_path_fails_at_parse_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = parse_error(["--data.path", "./nope.jsonl"])
    assert "--data.path" in message
    assert "./nope.jsonl" in message


def test_missing_local_eval_path_fails_at_parse_time(tmp_path):
    message = parse_error(["--data.eval_path", str(tmp_path / "nope.jsonl")])
    assert "--data.eval_path" in message


def test_missing_local_model_fails_at_parse_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    message = parse_error(["--model.name_or_path", "./nope", "--data.path", str(data)])
    assert "--model.name_or_path" in message
    assert "./nope" in message


def test_existing_local_data_path_parses(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    assert parse_config(["--data.path", str(data)]).data.path == str(data)


def test_resume_must_be_auto_never_or_a_directory(tmp_path):
    assert "checkpoint.resume" in parse_error(["--checkpoint.resume", str(tmp_path / "nope")])
    assert parse_config(["--checkpoint.resume", str(tmp_path)]).checkpoint.resume == str(tmp_path)
    assert parse_config(["--checkpoint.resume", "never"]).checkpoint.resume == "never"


def test_missing_config_file_is_a_config_error(tmp_path):
    assert "config" in parse_error(["--config", str(tmp_path / "missing.yaml")])


def test_malformed_yaml_is_a_config_error(tmp_path):
    recipe = write_yaml(tmp_path / "bad.yaml", "train: [\n  max_steps: 5\n")
    parse_error(["--config", str(recipe)])


# --------------------------------------------------------------------------------------------
# --print_config and YAML round trips
# --------------------------------------------------------------------------------------------

NON_DEFAULT = [
    "--train.max_steps",
    "50",
    "--optim.lr",
    "1e-4",
    "--optim.head_lr",
    "2e-5",
    "--optim.eps",
    "1e-7",
    "--optim.scheduler",
    "wsd",
    "--data.synthetic_tasks",
    "[add, copy]",
    "--eval.batch_size",
    "3",
    "--train.mixed_precision",
    "bf16",
    "--model.attn_implementation",
    "eager",
    "--log.progress_bar=false",
]


def test_print_config_prints_yaml_and_exits_zero(capsys, tmp_path):
    argv = [*NON_DEFAULT, "--output_dir", str(tmp_path / "out dir")]
    expected = parse_config(argv)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        parse_config([*argv, "--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    loaded = yaml.safe_load(printed)
    assert loaded == expected.to_dict()
    # fed back through --config it reproduces the same Config
    recipe = write_yaml(tmp_path / "printed.yaml", printed)
    assert parse_config(["--config", str(recipe)]).to_dict() == expected.to_dict()
    assert load_config_file(recipe).to_dict() == expected.to_dict()


def test_print_config_validates_first(capsys):
    with pytest.raises(ConfigError):
        parse_config(["--train.max_steps", "0", "--print_config"])
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "argv", [[], NON_DEFAULT, ["--train.max_steps", "null", "--train.num_epochs", "0.5"]]
)
def test_to_yaml_round_trip_via_load_config_file(tmp_path, argv):
    cfg = parse_config(argv)
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config_file(path)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_to_yaml_keeps_field_order():
    text = Config().to_yaml()
    assert list(yaml.safe_load(text)) == [
        "output_dir",
        "overwrite_output_dir",
        "model",
        "peft",
        "data",
        "train",
        "optim",
        "eval",
        "checkpoint",
        "log",
    ]


# --------------------------------------------------------------------------------------------
# data.sources
# --------------------------------------------------------------------------------------------


def sources_recipe(tmp_path: Path, sources: list[dict], **data) -> list[str]:
    for s in sources:
        path = Path(s.get("path", tmp_path / "x.jsonl"))
        if not path.name.startswith("missing"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text('{"text": "a"}\n')
    return ["--config", str(write_yaml(tmp_path / "r.yaml", {"data": {"sources": sources, **data}}))]


def test_sources_fill_their_nulls_from_the_data_section(tmp_path):
    from dtrain.config import resolved_sources

    cfg = parse_config(
        sources_recipe(
            tmp_path,
            [
                {"path": str(tmp_path / "web.jsonl"), "template": "text", "weight": 3},
                {"path": str(tmp_path / "sub" / "chat.jsonl"), "eval_fraction": 0},
            ],
            template="alpaca",
            eval_fraction=0.1,
        )
    )
    web, chat = resolved_sources(cfg.data)
    assert (web.name, web.template, web.weight, web.eval_fraction) == ("web", "text", 3.0, 0.1)
    assert (chat.name, chat.template, chat.weight, chat.eval_fraction) == ("chat", "alpaca", 1.0, 0.0)
    assert (
        load_config_file(write_yaml(tmp_path / "again.yaml", cfg.to_yaml())).data.sources == cfg.data.sources
    )


@pytest.mark.parametrize(
    ("sources", "data", "words"),
    [
        ([{"weight": 0}], {}, "--data.sources[0].weight must be a number > 0 (got 0"),
        ([{"weight": -2}], {}, "--data.sources[0].weight must be a number > 0 (got -2"),
        ([{"weight": "lots"}], {}, "--data.sources: a source's weight got 'lots', expected a number"),
        (
            [{"path": "X/a.jsonl"}, {"path": "X/b/a.jsonl"}],
            {},
            "two sources are named 'a' (X/a.jsonl and X/b/a.jsonl)",
        ),
        ([{"path": "X/missing.jsonl"}], {}, "--data.sources[0].path: 'X/missing.jsonl' does not exist"),
        ([{}], {"path": "X/x.jsonl"}, "--data.path and --data.sources both name train data"),
        ([{"wieght": 2}], {}, "unknown key 'wieght' in a source; did you mean 'weight'?"),
        ([{"eval_fraction": 1.5}], {}, "--data.sources[0].eval_fraction must be in [0, 1)"),
    ],
)
def test_bad_sources_are_refused_in_one_line_naming_the_source(tmp_path, sources, data, words):
    fill = lambda v: v.replace("X", str(tmp_path)) if isinstance(v, str) else v  # noqa: E731
    sources = [{"path": str(tmp_path / "x.jsonl"), **{k: fill(v) for k, v in s.items()}} for s in sources]
    message = parse_error(sources_recipe(tmp_path, sources, **{k: fill(v) for k, v in data.items()}))
    assert fill(words) in message and "\n" not in message

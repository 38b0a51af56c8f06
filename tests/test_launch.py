"""`dtrain launch`: every shipped profile loads and dry-runs; every pre-flight refusal is one clear line.

Fast: nothing here starts a training process (the 2-process runs are in test_profiles_matrix.py).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from dtrain import launch
from dtrain.config import parse_config

PROFILES = sorted(p.stem for p in (REPO / "accelerate_configs").glob("*.yaml"))
DS_FILES = sorted((REPO / "ds_configs").glob("*.json"))


def _launch(capsys, *argv: str) -> tuple[int, str, str]:
    code = launch.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _refused(capsys, *argv: str) -> str:
    code, out, err = _launch(capsys, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtrain launch: error:"), err
    return lines[0]


def test_the_ten_profiles_ship():
    assert (
        sorted(
            [
                "single_gpu",
                "ddp",
                "fsdp",
                "fsdp_offload",
                "hsdp",
                "zero1",
                "zero2",
                "zero3",
                "zero2_offload",
                "zero3_offload",
            ]
        )
        == PROFILES
    )


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_loads_and_dry_runs(name, capsys):
    text = (REPO / "accelerate_configs" / f"{name}.yaml").read_text()
    assert text.startswith("#") and "accelerate launch" in text  # the header says when and how
    settings = yaml.safe_load(text)
    assert "num_processes" not in settings or name == "single_gpu"  # the launch command decides
    gpus = "1" if name == "single_gpu" else "2"
    code, out, err = _launch(
        capsys, name, "--cpu", "--gpus", gpus, "--dry-run", "--", "--train.max_steps", "3"
    )
    assert code == 0, err
    line = out.strip().splitlines()[-1]
    assert line.startswith("dtrain launch: ")
    cmd = shlex.split(line.removeprefix("dtrain launch: "))
    assert cmd[cmd.index("--config_file") + 1] == str(REPO / "accelerate_configs" / f"{name}.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == gpus
    assert cmd[-3:] == [str(REPO / "dtrain" / "train.py"), "--train.max_steps", "3"]
    profile = launch.load_profile(name)
    if profile.kind == "deepspeed":
        assert "ACCELERATE_USE_CPU=1" not in line  # it would silently turn DeepSpeed into DDP
        ds = cmd[cmd.index("--deepspeed_config_file") + 1]
        assert Path(ds).is_absolute() and Path(ds).is_file()
    else:
        assert "ACCELERATE_USE_CPU=1" in line


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.name)
def test_deepspeed_configs_take_sizes_from_the_training_config(path):
    ds = json.loads(path.read_text())
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        assert ds[key] == "auto", key
    assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
    assert "optimizer" not in ds and "scheduler" not in ds  # dtrain builds its own
    stage = ds["zero_optimization"]["stage"]
    assert stage == int(path.stem[4])
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    referenced = {
        launch.load_profile(p).ds_config_path for p in PROFILES if launch.load_profile(p).kind == "deepspeed"
    }
    assert path.resolve() in referenced


@pytest.mark.parametrize(("profile", "optim"), [("fsdp", "adamw_8bit"), ("fsdp_offload", "paged_adamw_8bit")])
def test_bitsandbytes_on_fsdp_points_at_torchao(capsys, profile, optim):
    line = _refused(capsys, profile, "--cpu", "--dry-run", "--", "--optim.name", optim)
    assert "DTensor" in line and "adamw_8bit_ao" in line


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit", "adamw_8bit_ao", "sgd"])
def test_offload_with_a_non_adamw_optimizer_is_refused(capsys, optim):
    line = _refused(capsys, "zero2_offload", "--cpu", "--dry-run", "--", "--optim.name", optim)
    assert "offload" in line and "--optim.name adamw" in line


def test_zero_with_a_client_optimizer_needs_allow_untested(capsys, tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    del ds["zero_allow_untested_optimizer"]
    (tmp_path / "zero2.json").write_text(json.dumps(ds))
    prof = yaml.safe_load((REPO / "accelerate_configs" / "zero2.yaml").read_text())
    prof["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "zero2.json")
    (tmp_path / "custom.yaml").write_text(yaml.safe_dump(prof))
    line = _refused(
        capsys, str(tmp_path / "custom.yaml"), "--cpu", "--dry-run", "--", "--optim.name", "adamw_8bit"
    )
    assert "zero_allow_untested_optimizer" in line
    code, _, _ = _launch(capsys, str(tmp_path / "custom.yaml"), "--cpu", "--dry-run")  # plain adamw is fine
    assert code == 0


def test_gpus_requested_without_gpus(capsys):
    line = _refused(capsys, "ddp", "--gpus", "4", "--dry-run")
    assert "no CUDA GPU" in line and "--cpu" in line


def test_preflight_gpu_count_and_bf16_support():
    """The checks that need GPUs are fed the facts directly (no GPU on this machine)."""
    cfg = parse_config(["--train.mixed_precision", "bf16"])
    problems = launch.preflight(
        launch.load_profile("ddp"), cfg, gpus=8, cpu=False, gpus_present=4, bf16_ok=False
    )
    assert any("--gpus 8 but only 4" in p for p in problems)
    assert any("bf16" in p and "fp16" in p for p in problems)
    ok = launch.preflight(launch.load_profile("ddp"), cfg, gpus=4, cpu=False, gpus_present=4, bf16_ok=True)
    assert ok == []


def test_missing_packages_name_the_extra(monkeypatch):
    """deepspeed and torchao are installed here, so their absence is simulated (a mock, said so)."""
    real = launch.importlib.util.find_spec
    monkeypatch.setattr(
        launch.importlib.util,
        "find_spec",
        lambda name: None if name in ("deepspeed", "torchao") else real(name),
    )
    cfg = parse_config(["--optim.name", "adamw_8bit_ao"])
    problems = launch.preflight(
        launch.load_profile("zero2"), cfg, gpus=2, cpu=True, gpus_present=0, bf16_ok=False
    )
    assert any("dtrain[deepspeed]" in p for p in problems)
    assert any("dtrain[torchao]" in p for p in problems)


def test_single_gpu_profile_with_many_gpus(capsys):
    assert "runs one process" in _refused(capsys, "single_gpu", "--cpu", "--gpus", "2", "--dry-run")


def test_unknown_profile_lists_the_choices(capsys):
    line = _refused(capsys, "zero4", "--dry-run")
    assert "unknown profile 'zero4'" in line and "zero3" in line


def test_bad_training_flags_are_caught_before_launch(capsys):
    line = _refused(capsys, "ddp", "--cpu", "--dry-run", "--", "--train.max_stepz", "3")
    assert "train.max_steps" in line


def test_fp16_rehearsal_on_cpu_is_refused(capsys):
    assert "fp16" in _refused(capsys, "ddp", "--cpu", "--dry-run", "--", "--train.mixed_precision", "fp16")


def test_multi_node_command(capsys):
    assert "--main-address" in _refused(capsys, "ddp", "--cpu", "--nodes", "2", "--dry-run")
    code, out, _ = _launch(
        capsys,
        "zero3",
        "--cpu",
        "--gpus",
        "2",
        "--nodes",
        "2",
        "--node-rank",
        "1",
        "--main-address",
        "10.1.2.3:29555",
        "--dry-run",
    )
    assert code == 0
    cmd = shlex.split(out.strip().splitlines()[-1].removeprefix("dtrain launch: "))
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[cmd.index("--num_machines") + 1] == "2"
    assert cmd[cmd.index("--machine_rank") + 1] == "1"
    assert cmd[cmd.index("--main_process_ip") + 1] == "10.1.2.3"
    assert cmd[cmd.index("--main_process_port") + 1] == "29555"


def _zero2_with(**ds_values) -> launch.Profile:
    """The zero2 profile with its DeepSpeed JSON changed in memory (preflight is a pure function)."""
    profile = launch.load_profile("zero2")
    profile.ds_config = {**profile.ds_config, **ds_values}
    return profile


@pytest.mark.parametrize(
    ("key", "value", "flag", "flag_value"),
    [
        ("train_micro_batch_size_per_gpu", 4, "--train.per_device_batch_size", "8"),
        ("gradient_accumulation_steps", 2, "--train.gradient_accumulation_steps", "1"),
        ("gradient_clipping", 0.5, "--train.max_grad_norm", "1.0"),
    ],
)
def test_deepspeed_json_that_contradicts_a_training_flag(key, value, flag, flag_value):
    cfg = parse_config([flag, flag_value])
    problems = launch.preflight(
        _zero2_with(**{key: value}), cfg, gpus=2, cpu=True, gpus_present=0, bf16_ok=False
    )
    assert len(problems) == 1, problems
    assert f"{key}={value}" in problems[0] and flag in problems[0] and '"auto"' in problems[0]
    # the same value on both sides is no contradiction
    same = parse_config([flag, str(value)])
    assert (
        launch.preflight(_zero2_with(**{key: value}), same, gpus=2, cpu=True, gpus_present=0, bf16_ok=False)
        == []
    )


def test_deepspeed_fixed_global_batch_is_checked_against_processes_and_nodes():
    cfg = parse_config(["--train.per_device_batch_size", "4", "--train.gradient_accumulation_steps", "2"])
    profile = _zero2_with(train_batch_size=16)  # 4 x 2 x 2 processes
    assert launch.preflight(profile, cfg, gpus=2, cpu=True, gpus_present=0, bf16_ok=False) == []
    problems = launch.preflight(profile, cfg, gpus=2, cpu=True, gpus_present=0, bf16_ok=False, nodes=2)
    assert len(problems) == 1 and "train_batch_size=16" in problems[0] and "= 32" in problems[0]


def test_deepspeed_precision_and_optimizer_sections_that_contradict_dtrain():
    cfg = parse_config(["--train.mixed_precision", "no"])
    profile = _zero2_with(bf16={"enabled": True}, optimizer={"type": "AdamW"}, scheduler={"type": "WarmupLR"})
    problems = launch.preflight(profile, cfg, gpus=2, cpu=True, gpus_present=0, bf16_ok=False)
    assert any("enables bf16" in p and "--train.mixed_precision is no" in p for p in problems)
    assert any('"optimizer" section' in p and "--optim" in p for p in problems)
    assert any('"scheduler" section' in p for p in problems)
    # without --train.mixed_precision the JSON decides the precision: no contradiction
    assert not any(
        "bf16" in p
        for p in launch.preflight(
            _zero2_with(bf16={"enabled": True}),
            parse_config([]),
            gpus=2,
            cpu=True,
            gpus_present=0,
            bf16_ok=False,
        )
    )


def test_single_gpu_profile_on_several_nodes(capsys):
    cfg = parse_config([])
    problems = launch.preflight(
        launch.load_profile("single_gpu"), cfg, gpus=1, cpu=True, gpus_present=0, bf16_ok=False, nodes=2
    )
    assert len(problems) == 1 and "--nodes 2" in problems[0] and "one machine" in problems[0]
    line = _refused(
        capsys,
        "single_gpu",
        "--cpu",
        "--gpus",
        "1",
        "--nodes",
        "2",
        "--main-address",
        "10.0.0.1",
        "--dry-run",
    )
    assert "--nodes 2" in line and "ddp" in line


def test_deepspeed_json_contradiction_is_refused_before_launch(capsys, tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "zero2.json").write_text(json.dumps(ds))
    prof = yaml.safe_load((REPO / "accelerate_configs" / "zero2.yaml").read_text())
    prof["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "zero2.json")
    (tmp_path / "custom.yaml").write_text(yaml.safe_dump(prof))
    line = _refused(
        capsys,
        str(tmp_path / "custom.yaml"),
        "--cpu",
        "--dry-run",
        "--",
        "--train.per_device_batch_size",
        "8",
    )
    assert "train_micro_batch_size_per_gpu=4" in line and "--train.per_device_batch_size" in line


@pytest.mark.parametrize(
    "section,key", [("bf16", "check_grad_overflow"), ("zero_optimization", "compute_grad_norm")]
)
def test_deepspeed_json_that_turns_off_the_engines_nonfinite_check(section, key):
    """dtrain's --train.nonfinite reads DeepSpeed's own check of the gradient norm (guards.py)."""
    profile = launch.load_profile("zero2")
    profile.ds_config = {**profile.ds_config, section: {**profile.ds_config.get(section, {}), key: False}}
    problems = launch.preflight(profile, parse_config([]), gpus=2, cpu=True, gpus_present=0, bf16_ok=False)
    assert len(problems) == 1 and f"{section}.{key}=false" in problems[0] and "NaN" in problems[0]
    # fp16: DeepSpeed's loss scaler checks every step whatever these say
    fp16 = parse_config(["--train.mixed_precision", "fp16"])
    assert not any(
        key in p for p in launch.preflight(profile, fp16, gpus=2, cpu=True, gpus_present=0, bf16_ok=False)
    )


def test_the_rank_that_caused_a_failure_is_the_one_named():
    """torchrun's failures as its ChildFailedError reports them (built here; a real run cannot order
    these deaths at will): the cause is named, not the ranks that lost it or that the launcher stopped."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from dtrain.launch_accelerate import root_failure

    def failed(**codes_at):  # rank -> (exit code, timestamp)
        failures = {}
        for rank, (code, at) in codes_at.items():
            f = ProcessFailure(local_rank=int(rank[1:]), pid=1, exitcode=code, error_file="")
            f.timestamp = at
            failures[int(rank[1:])] = f
        return ChildFailedError("train.py", failures)

    assert root_failure(failed(r0=(-15, 100), r1=(2, 100)))[0] == 1  # a user error, the other rank stopped
    assert root_failure(failed(r0=(69, 100), r1=(-9, 100)))[0] == 1  # killed; rank 0 lost it
    # frozen: rank 0 timed out, then rank 1 killed
    assert root_failure(failed(r0=(69, 100), r1=(-9, 130)))[0] == 0
    assert root_failure(failed(r0=(-15, 100), r1=(-11, 101)))[0] == 1  # a segfault, not the teardown

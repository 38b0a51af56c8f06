"""Shared helpers: a tiny, fast run of the real script, and subprocess runners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "dtrain" / "train.py"

# The shipped smoke recipe: a run of seconds on 2 CPU cores (a 2-layer, 32-wide Llama, 240 examples).
TINY = ["--config", str(REPO / "dtrain" / "recipes" / "smoke.yaml"), "--log.progress_bar", "false"]


def env_for_subprocess(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
        }
    )
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_train(args: list[str], timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """`python dtrain/train.py ARGS` in a fresh process, as a user would run it."""
    return subprocess.run(
        [sys.executable, str(TRAIN), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_for_subprocess(**env),
    )


def run_dtrain(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The `dtrain` console script (`python -m dtrain.cli ARGS`)."""
    return subprocess.run(
        [sys.executable, "-m", "dtrain.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_for_subprocess(),
    )


def run_accelerate(
    num_processes: int, args: list[str], cpu: bool = True, timeout: int = 900
) -> subprocess.CompletedProcess:
    """A real multi-process launch. cpu=True: gloo ranks, the way PLATFORM.md says works here;
    cpu=False: the same launch without ACCELERATE_USE_CPU (on this machine, a mistake)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(TRAIN),
        *args,
    ]
    env = env_for_subprocess(ACCELERATE_USE_CPU="1") if cpu else env_for_subprocess()
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def accelerate_with_profile(
    profile: str, launcher_args: list[str], args: list[str], **env: str
) -> subprocess.CompletedProcess:
    """A plain `accelerate launch --config_file accelerate_configs/PROFILE.yaml LAUNCHER_ARGS train.py ARGS`,
    as a user types it by hand (not through dtrain launch)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / f"{profile}.yaml"),
        *launcher_args,
        "--main_process_port",
        str(_free_port()),
        str(TRAIN),
        *args,
    ]
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env_for_subprocess(**env)
    )


def mount_tmpfs(path: Path, size_kb: int) -> bool:
    """A real small disk under `path` (root with CAP_SYS_ADMIN), to fill up; False where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def launch_cmd(profile: str, args: list[str], gpus: int = 2, launch_args: tuple[str, ...] = ()) -> list[str]:
    """`dtrain launch PROFILE --cpu`: the profile rehearsed on gloo ranks."""
    port = f"127.0.0.1:{_free_port()}"
    return [
        sys.executable,
        "-m",
        "dtrain.cli",
        "launch",
        profile,
        "--cpu",
        "--gpus",
        str(gpus),
        "--main-address",
        port,
        *launch_args,
        "--",
        *args,
    ]


def dtrain_launch(
    profile: str, args: list[str], gpus: int = 2, launch_args: tuple[str, ...] = (), **env: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        launch_cmd(profile, args, gpus, launch_args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=env_for_subprocess(**env),
    )


# One uninterrupted 2-rank `dtrain launch ddp` run, the reference of every test that interrupts the same
# command (a stop request, a killed rank) and reruns it: the losses must come out bitwise equal.
LONG_DDP = [
    *TINY,
    "--train.max_steps",
    "120",
    "--checkpoint.save_steps",
    "10",
    "--eval.steps",
    "0",
    "--eval.num_generate",
    "0",
    "--eval.num_samples",
    "0",
    "--log.every_steps",
    "1",
    "--train.collective_timeout_s",
    "10",
]


# The straight run also profiles steps 3-4 (tests/test_profiling.py reads its traces and log.txt): the runs
# compared with it do not, so their bitwise-equal losses also show that profiling changes no numerics.
PROFILED = ["--log.profile_steps", "3-4"]


@pytest.fixture(scope="session")
def straight_long_ddp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight-long-ddp") / "run"
    proc = dtrain_launch("ddp", [*LONG_DDP, *PROFILED, "--output_dir", str(out)])
    assert_ok(proc)
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    return out


# Uninterrupted 6-step runs with a checkpoint at steps 3 and 6, as one process (8 examples a step) and under
# each launch profile on 2 CPU ranks (2 x 4), hsdp on 4 (2 x 2 mesh, 4 x 2): the profile matrix and
# tests/test_mesh.py compare them, the resharding tests resume their checkpoints elsewhere. Each is made once per session, on first use; tests only read them.
# 64 wide: DeepSpeed pads each rank's gradient partition (1,680 elements here), which at the smoke recipe's
# 24k parameters would be 14% of zero1's gradients (tests/test_plan.py compares the bytes every rank holds)
PROFILE_SHAPE = [
    *TINY,
    *("--model.hidden_size", "64", "--model.intermediate_size", "256"),
    *("--train.max_steps", "6", "--checkpoint.save_steps", "3", "--eval.steps", "3"),
]
ONE_PROCESS = ["--train.per_device_batch_size", "8"]
# hsdp: a 2 x 2 mesh (dp_replicate x dp_shard) on 4 CPU ranks, 4 x 2 a step; one thread a rank (4 ranks on 2 cores)
HSDP_2X2 = {"gpus": 4, "launch_args": ("--replicas", "2"), "OMP_NUM_THREADS": "1"}
HSDP_BATCH = ["--train.per_device_batch_size", "2"]


class ProfileRuns:
    def __init__(self, root: Path):
        self.root, self.done = root, {}

    def __call__(self, where: str) -> tuple[Path, subprocess.CompletedProcess]:
        """`one` or a profile name -> (its output directory, its finished process)."""
        if where not in self.done:
            out = self.root / where
            args = [*PROFILE_SHAPE, "--output_dir", str(out)]
            if where == "one":
                proc = run_train([*args, *ONE_PROCESS])
            elif where == "hsdp":
                proc = dtrain_launch(where, [*args, *HSDP_BATCH], **HSDP_2X2)
            else:
                proc = dtrain_launch(where, args)
            assert_ok(proc)
            self.done[where] = (out, proc)
        return self.done[where]


@pytest.fixture(scope="session")
def profile_runs(tmp_path_factory) -> ProfileRuns:
    return ProfileRuns(tmp_path_factory.mktemp("profile-runs"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_after_checkpoints(args: list[str], out: Path, checkpoints: int = 2) -> None:
    """`python dtrain/train.py ARGS --output_dir OUT`, SIGKILLed once `checkpoints` checkpoints are
    committed (the test fails if the run ends first)."""
    import signal
    import time

    cmd = [sys.executable, str(TRAIN), *args, "--output_dir", str(out)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_for_subprocess()
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "checkpoints").glob("step-*/dtrain_checkpoint.json"))) >= checkpoints:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed: give it more steps"


def read_metrics(output_dir: Path) -> list[dict]:
    return [
        json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]


def train_rows(output_dir: Path) -> list[dict]:
    return [r for r in read_metrics(output_dir) if "loss" in r]


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A locally created HF model directory (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dtrain.tasks import build_char_tokenizer

    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    tok = build_char_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def fresh_accelerator(gradient_accumulation_steps: int = 1):
    """A new single-process CPU Accelerator (Accelerate's state is a process-wide singleton)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, cpu=True)


def tiny_llama(tokenizer, num_layers: int = 2):
    """The smoke recipe's model shape, seeded."""
    import torch

    from dtrain.config import DataConfig, EvalConfig, ModelConfig
    from dtrain.modeling import build_model

    torch.manual_seed(0)
    shape = ModelConfig(hidden_size=32, num_layers=num_layers, num_heads=2, intermediate_size=64)
    return build_model(shape, tokenizer, DataConfig(), EvalConfig())


# --------------------------------------------------------------------------------------------
# Users' own pretrained directories: tiny random models of several families, each saved with
# save_pretrained next to a tokenizer and loaded back by path (no download).
# --------------------------------------------------------------------------------------------

EOS = "<|endoftext|>"


def bpe_tokenizer(texts: list[str], pad: bool, vocab_size: int = 300):
    """A real byte-level BPE tokenizer (GPT-2's scheme) trained locally on `texts`. pad=False leaves it
    without a pad token, as GPT-2 ships; pad=True adds a distinct '<pad>' token."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    specials = [EOS, "<pad>"] if pad else [EOS]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=1, special_tokens=specials, show_progress=False
    )
    extra = {"pad_token": "<pad>"} if pad else {}
    tok = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, **extra
    )
    assert (tok.pad_token is not None) == pad
    return tok


def tiny_config(family: str, tokenizer, vocab_size: int | None = None, max_positions: int = 256, **sizes):
    """A 2-layer, 32-wide config of `family` (llama, qwen2, gpt2, gpt_neox); `sizes` (hidden_size=1024,
    num_hidden_layers=4, ...) override its fields. The vocabulary is the tokenizer's rounded up to a
    multiple of 64, as real checkpoints pad it."""
    import transformers

    common = {
        "vocab_size": vocab_size or -(-len(tokenizer) // 64) * 64,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    decoder = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": max_positions,
    }
    if family == "llama":  # untied head, grouped-query attention
        cls, fields = (
            transformers.LlamaConfig,
            {**decoder, "num_key_value_heads": 1, "tie_word_embeddings": False},
        )
    elif family == "qwen2":  # tied head, attention biases
        cls, fields = (
            transformers.Qwen2Config,
            {**decoder, "num_key_value_heads": 1, "tie_word_embeddings": True},
        )
    elif family == "gpt2":
        # tied head, learned absolute positions (a hard limit: n_positions). Dropout off: GPT-2's default 0.1
        # draws other masks on 2 ranks than on 1 process, so profiles could not be compared
        cls = transformers.GPT2Config
        fields = {
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 2,
            "n_positions": max_positions,
            "tie_word_embeddings": True,
        }
        fields |= {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    elif family == "gpt_neox":  # decoder layer class GPTNeoXLayer, untied head, partial rotary
        cls, fields = transformers.GPTNeoXConfig, {**decoder, "tie_word_embeddings": False}
    else:
        raise ValueError(family)
    return cls(**{**common, **fields, **sizes})


def save_pretrained_dir(path: Path, family: str, tokenizer, seed: int = 0, **config_kwargs) -> Path:
    """A model of `family` with random weights from torch seed `seed`, saved with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------
# Templates and data: a multi-turn conversation and the embedded character tokenizer
# --------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "SYSTEMTEXT"},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "FIRST REPLY"},
    {"role": "user", "content": "again please"},
    {"role": "assistant", "content": "SECOND REPLY"},
]


@pytest.fixture(scope="module")
def tok():
    """The embedded character tokenizer (test modules with another tokenizer define their own `tok`)."""
    from dtrain.tasks import build_char_tokenizer

    return build_char_tokenizer()


def trained(encoded: dict) -> list[int]:
    """The label ids an encoded example trains on."""
    from dtrain.data.templates import IGNORE_INDEX

    return [t for t in encoded["labels"] if t != IGNORE_INDEX]

"""What the GPU suite's tests share: whether CUDA is here, the attention kernel, the runs (each launched once,
side by side on the one GPU, on first use), and the comparisons.

The runs are small (the smoke recipe's 2-layer Llama; a 45M-parameter base for QLoRA) so that a GPU, lent for
minutes, runs them all at once: `RunPool` starts every run the selected tests name (`@uses(...)`) when the
first of them is asked for and hands each test its own as soon as it has finished. The compile timings are
taken with nothing else running (`RunPool.drain`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, _free_port, env_for_subprocess, run_train, save_pretrained_dir, train_rows
from test_guards import nan_row, write_tiny_llama
from test_peft import write_capitals

CUDA = torch.cuda.is_available()
NO_CUDA = (
    "no CUDA GPU: torch.cuda.is_available() is false; the GPU suite runs with `make test-gpu` on a machine "
    "with one (docs/gpu.md)"
)

# bf16 keeps 8 bits of mantissa: one rounding is a relative 2**-8 = 0.4%. The first step starts from the same
# weights (only rounding differs); later steps also carry the rounding of the updates before them.
BF16_FIRST_STEP_RTOL = 2 * 2**-8
BF16_RTOL = 2e-2

FIGURES: dict[str, dict] = {}  # test node id -> {figure: value}, written to the report (conftest.py)
RUN_SECONDS: dict[str, float] = {}  # run name -> seconds from launch to exit


def uses(*names: str):
    """The runs a test reads: all of them start together when the first is needed."""
    return pytest.mark.gpu_runs(*names)


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@functools.cache
def attention() -> str:
    """flash_attention_2 when flash_attn imports (its varlen path with the packed collator's cu_seq_lens),
    else sdpa."""
    try:
        import flash_attn  # noqa: F401
    except Exception:  # not installed, or built for another torch
        return "sdpa"
    return "flash_attention_2"


def cuda_accelerator(mixed_precision: str = "bf16"):
    """A new single-process Accelerator on the GPU (Accelerate's state is a process-wide singleton)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision)


def on_cuda(batch: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in train_rows(out)]


def finite_and_falling(values: list[float]) -> bool:
    return bool(values) and all(v is not None and math.isfinite(v) for v in values) and values[-1] < values[0]


def worst_rel(a: list[float], b: list[float]) -> float:
    """The largest |a - b| / |b| over the steps."""
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def run_info(out: Path) -> dict:
    return json.loads((out / "run_info.json").read_text())


def checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def step_seconds(out: Path, warmup: int) -> float:
    """Median seconds per optimizer step after `warmup` steps, from metrics.jsonl (one row a step: the
    tokens of the step over its tokens/s)."""
    import statistics

    rows, times, prev = train_rows(out), [], 0
    for r in rows:
        if r["step"] > warmup and r.get("tokens_per_sec"):
            times.append((r["tokens"] - prev) / r["tokens_per_sec"])
        prev = r["tokens"]
    assert times, f"no train row after step {warmup}"
    return statistics.median(times)


def gpu_launch(
    profile: str, args: list[str], gpus: int = 1, timeout: int = 900
) -> subprocess.CompletedProcess:
    """`dtrain launch PROFILE --gpus N -- ARGS` on the GPU (conftest.dtrain_launch rehearses on CPU)."""
    cmd = [sys.executable, "-m", "dtrain.cli", "launch", profile, "--gpus", str(gpus)]
    cmd += ["--main-address", f"127.0.0.1:{_free_port()}", "--", *args]
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env_for_subprocess()
    )


# --------------------------------------------------------------------------------------------
# The inputs: models and data written once per session
# --------------------------------------------------------------------------------------------

# The smoke recipe, 8 steps, a checkpoint at 4 and at the end, eval and generation off (the end's eval loss
# on 16 examples stays)
SHORT = [
    *TINY,
    *("--train.max_steps", "8", "--checkpoint.save_steps", "4"),
    *("--eval.steps", "0", "--eval.num_generate", "0", "--eval.num_samples", "0"),
]
# 256 wide: every matrix has the 4,096 elements from which bitsandbytes and torchao keep 8-bit state, and the
# MLP's 256 x 512 = 131,072 pass the 1e5 from which bitsandbytes pages a paged optimizer's state
WIDE = ["--model.hidden_size", "256", "--model.intermediate_size", "512"]
# fsdp and zero3 on one GPU: 6 steps, a checkpoint at 3 (resumed from) and at 6
PROFILE_ARGS = [
    *TINY,
    *("--train.max_steps", "6", "--checkpoint.save_steps", "3", "--train.mixed_precision", "bf16"),
    *("--eval.steps", "0", "--eval.num_generate", "0", "--eval.num_samples", "0"),
]
HEAD_GAIN = 300.0  # the overflow model's output head, times its random init (see hot_head_model)


def nan_row_model(path: Path) -> Path:
    """The CPU guard tests' fault (tests/test_guards.py): a Llama directory whose embedding row for `~` is
    NaN; only an example with a `~` reaches it."""
    return write_tiny_llama(path, nan_row)


def hot_head_model(path: Path) -> Path:
    """The same Llama with its output head 300x its random init: the logits stay far below fp16's 65504 and
    the loss finite, but the gradient into the head's input, at the grad scaler's first scale (65536), does
    not fit in fp16. The scaler skips steps and halves its scale until it does: about 6 halvings in a CPU
    fp16-autocast check of this model on four of these examples (the same fp16 arithmetic as on CUDA)."""
    return write_tiny_llama(path, lambda model, _tok: model.get_output_embeddings().weight.mul_(HEAD_GAIN))


def qlora_base(root: Path) -> tuple[Path, Path]:
    """(model directory, alpaca data): tests/test_peft.py's words-in-capitals data, on a Qwen2 of 45M
    parameters, so that its weights (180 MB in fp32, ~25 MB in 4-bit), not the CUDA libraries' workspaces,
    decide the peak memory of the QLoRA and LoRA runs."""
    from dtrain.tasks import build_char_tokenizer

    data = write_capitals(root / "alpaca.jsonl")
    sizes = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 8}
    save_pretrained_dir(
        root / "model",
        "qwen2",
        build_char_tokenizer(),
        seed=7,
        max_positions=512,
        num_key_value_heads=2,
        **sizes,
    )
    return root / "model", data


def peft_args(base: Path, data: Path, method: str) -> list[str]:
    return [
        *TINY,
        *("--model.name_or_path", str(base), "--data.path", str(data), "--data.template", "alpaca"),
        *("--peft.method", method, "--peft.r", "8", "--peft.alpha", "16"),
        *("--train.max_steps", "8", "--train.mixed_precision", "bf16", "--optim.lr", "5e-3"),
        *("--eval.steps", "0", "--eval.num_generate", "0", "--eval.num_samples", "0"),
        *("--checkpoint.save_steps", "0"),
    ]


# --------------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    out: Path
    proc: subprocess.CompletedProcess
    seconds: float


# run name -> the libraries it needs (the test is skipped without them)
NEEDS = {
    "adamw_8bit": ("bitsandbytes",),
    "paged_adamw_8bit": ("bitsandbytes",),
    "adamw_8bit_ao": ("torchao",),
    "lora": ("peft",),
    "qlora": ("peft", "bitsandbytes"),
    "zero3": ("deepspeed",),
    "zero3_resumed": ("deepspeed",),
}


class RunPool:
    """Each run once, all the selected tests' runs side by side. `pool[name]` waits for that run only."""

    def __init__(self, root: Path, wanted: list[str]):
        self.root, self.wanted = root, list(dict.fromkeys(wanted))
        self.futures: dict[str, Future] = {}
        self.inputs: dict[str, object] = {}
        self.lock = threading.RLock()
        self.executor = ThreadPoolExecutor(max_workers=len(JOBS), thread_name_prefix="gpu-run")

    def __getitem__(self, name: str) -> Run:
        missing = [m for m in NEEDS.get(name, ()) if not have(m)]
        if missing:
            pytest.skip(f"run {name} needs {', '.join(missing)}, which is not installed")
        with self.lock:
            self._start([*([] if self.futures else self.wanted), name])
        return self.futures[name].result()

    def _start(self, names: list[str]) -> None:
        """Build each run's inputs here (one thread: the seeds are global) and launch it in the pool."""
        for name in dict.fromkeys(names):
            if name in self.futures or any(not have(m) for m in NEEDS.get(name, ())):
                continue
            out = self.root / name
            self.futures[name] = self.executor.submit(self._timed, name, out, JOBS[name](self, out))

    @staticmethod
    def _timed(name: str, out: Path, launch: Callable[[], subprocess.CompletedProcess]) -> Run:
        start = time.perf_counter()
        proc = launch()
        RUN_SECONDS[name] = round(time.perf_counter() - start, 1)
        return Run(out, proc, RUN_SECONDS[name])

    def input(self, key: str, build: Callable[[Path], object]):
        """A model or data set several runs read, built once."""
        with self.lock:
            if key not in self.inputs:
                path = self.root / "inputs" / key
                path.mkdir(parents=True, exist_ok=True)
                self.inputs[key] = build(path)
            return self.inputs[key]

    def drain(self) -> None:
        """Wait for every run started so far (the compile timings want the GPU and the CPUs to themselves)."""
        for future in list(self.futures.values()):
            future.exception()

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def _train(args: list[str]) -> Callable[[RunPool, Path], Callable[[], subprocess.CompletedProcess]]:
    return lambda pool, out: functools.partial(run_train, [*args, "--output_dir", str(out)])


def _guard_args(model: Path, data: Path, eval_data: Path, out: Path, *extra: str) -> list[str]:
    import test_guards

    return test_guards.args(model, data, eval_data, out, *extra)


def _overflow(pool: RunPool, out: Path):
    """fp16 on the hot-head model, 12 steps of clean text (tests/test_guards.py's examples), a checkpoint each."""
    from test_guards import example

    def data(path: Path) -> tuple[Path, Path]:
        train, evalset = path / "train.jsonl", path / "eval.jsonl"
        train.write_text("".join(json.dumps(example(i)) + "\n" for i in range(64)))
        evalset.write_text("".join(json.dumps(example(i)) + "\n" for i in range(100, 108)))
        return train, evalset

    model = pool.input("hot_head", hot_head_model)
    train, evalset = pool.input("text", data)
    extra = ["--train.mixed_precision", "fp16", "--train.max_steps", "12", "--checkpoint.save_steps", "1"]
    extra += ["--checkpoint.keep_last", "12"]
    return functools.partial(run_train, _guard_args(model, train, evalset, out, *extra))


def _nan_guard(pool: RunPool, out: Path):
    """tests/test_guards.py's one-process skip run, in bf16 on the GPU: the example with `~` at step 3."""
    from test_guards import write_data

    model = pool.input("nan_row", nan_row_model)
    poisoned, _, evalset, _ = pool.input("nan_data", lambda p: write_data(p, world=1, poison_rank=0))
    extra = ["--checkpoint.save_steps", "1", "--train.mixed_precision", "bf16"]
    return functools.partial(run_train, _guard_args(model, poisoned, evalset, out, *extra))


def _peft(method: str):
    def job(pool: RunPool, out: Path):
        base, data = pool.input("qlora_base", qlora_base)
        return functools.partial(run_train, [*peft_args(base, data, method), "--output_dir", str(out)])

    return job


def _profile(profile: str):
    return lambda pool, out: functools.partial(gpu_launch, profile, [*PROFILE_ARGS, "--output_dir", str(out)])


def _resumed(profile: str):
    """The same command again in a fresh directory holding only the straight run's step-3 checkpoint (and its
    tokenized data): it resumes there and must repeat steps 4..6 exactly."""

    def job(pool: RunPool, out: Path):
        def launch() -> subprocess.CompletedProcess:
            straight = pool[profile]
            if straight.proc.returncode != 0:
                raise RuntimeError(f"the straight {profile} run failed (exit {straight.proc.returncode})")
            (out / "checkpoints").mkdir(parents=True)
            shutil.copytree(checkpoint(straight.out, 3), checkpoint(out, 3))
            shutil.copytree(straight.out / "data", out / "data")
            return gpu_launch(profile, [*PROFILE_ARGS, "--output_dir", str(out)])

        return launch

    return job


JOBS: dict[str, Callable[[RunPool, Path], Callable[[], subprocess.CompletedProcess]]] = {
    "fp32": _train([*SHORT, "--train.mixed_precision", "no"]),
    "bf16": _train([*SHORT, "--train.mixed_precision", "bf16"]),
    "fp16": _train([*SHORT, "--train.mixed_precision", "fp16"]),
    "fp16_overflow": _overflow,
    "nan_guard": _nan_guard,
    **{
        name: _train([*SHORT, *WIDE, "--train.mixed_precision", "bf16", "--optim.name", name])
        for name in ("adamw_8bit", "paged_adamw_8bit", "adamw_8bit_ao")
    },
    "lora": _peft("lora"),
    "qlora": _peft("qlora"),
    "packed": lambda pool, out: functools.partial(
        run_train,
        [
            *SHORT,
            *("--train.mixed_precision", "bf16", "--data.packing", "true"),
            *("--model.attn_implementation", attention(), "--output_dir", str(out)),
        ],
    ),
    "fsdp": _profile("fsdp"),
    "zero3": _profile("zero3"),
    "fsdp_resumed": _resumed("fsdp"),
    "zero3_resumed": _resumed("zero3"),
}

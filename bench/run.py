"""One benchmark run comparing dtrain with transformers Trainer and minimal hand-written loops.

    make bench                              # full CPU mode: 3-5 repeats (~11 min on 2 cores, + ~10 min of data)
    make bench ARGS=--quick                 # every case once, 2-3 steps (~4 min; CI: proves it runs, judges nothing)
    .venv/bin/python bench/run.py --gpu     # GPU mode: a ~1B Llama, bf16, packing, MFU (~8 min)
    .venv/bin/python bench/run.py --quick --only overhead,memory --keep   # a subset; keep the work dir

Results: a table per section on stdout and JSON in bench/results/<quick|full|gpu>.json (--out PATH).

How it measures
- Every case is its own process (peak RSS from wait4 belongs to that case alone; no import leaks
  between cases), and the cases of a section run alternately: repeat 1 = case A, B, C...; repeat 2 =
  A, B, C... so slow drift of the machine hits every case alike. Medians over repeats are shown, with
  the spread (max - min) / median as "±". A busy machine (load average printed at the start) makes
  timings noisy: OpenMP threads spinning against other processes can slow a step 5x. The overhead
  section therefore runs with OMP_NUM_THREADS=1 (--overhead-threads), the others with all cores
  (--threads; quick mode uses 1 everywhere).
- Data: seeded synthetic SFT rows in chat format (a `messages` column), written to a jsonl file, with
  long-tailed lengths (most examples short, 4% at max_length). Models: random-init Llamas saved with
  `save_pretrained` next to dtrain's char tokenizer in a temporary directory; every case loads the same
  directory (dtrain with `--model.name_or_path DIR --model.tokenizer DIR`, the path users take).
- dtrain runs are the real CLI (`python dtrain/train.py ...`; `dtrain launch PROFILE --cpu` for the
  profiles), eval/generation/periodic checkpoints off (`--eval.steps 0 --eval.num_generate 0
  --checkpoint.save_steps 0`; the end-of-run eval of a 4-row eval file, the final checkpoint and export
  still run but are outside the timed steps). Throughput is read back from `<output_dir>/metrics.jsonl`:
  with `--log.every_steps W` and W warm-up steps, the rows after the first cover exactly steps W+1..N;
  their seconds are (tokens - previous tokens) / tokens_per_sec and their real (non-padding) tokens are
  the `tokens` differences. The Trainer and the loops (bench/cases.py) time the same span: from the end
  of step W to the end of step N, data loading included, counting real tokens on the host.
- Same batches: the Trainer and the loops read dtrain's tokenization (`dtrain.data.templates.encode_batch`)
  in dtrain's data order (`dtrain.data.DataOrder`) with a sequential sampler, so every unpacked case
  trains the very batches dtrain trains. AdamW everywhere with the same lr, betas, eps, weight decay
  (on matrices only), clipping 1.0 and cosine schedule with the same warm-up; foreach AdamW on CPU,
  fused on CUDA (what dtrain picks). Global batch: the unpacked cases take B examples per step; dtrain
  with packing takes round(B x mean length / max_length) packed rows, the same tokens per step as near
  as rows allow (real tokens/step is in the table to check). The Trainer keeps its defaults otherwise,
  except logging_nan_inf_filter (off: its per-step isnan check is a host sync) and no checkpointing.

Sections
1. overhead: dtrain's loop (the CLI, metrics.jsonl) against a minimal Accelerate loop (accumulate,
   backward, clip, optimizer.step, zero_grad; no attention mask and no KV cache, as dtrain's forward) on
   a tiny model, where per-step overhead shows. The CLI rather than in-process `train_step` calls:
   it measures everything dtrain does per step (data loader, bookkeeping, stop-request agreement,
   logging), which is what a user pays. Goal: dtrain step time <= 1.03x the minimal loop.
2. throughput: non-padding tokens/s on a model where attention/MLP dominate (hidden 256, 4 layers):
   dtrain --data.packing true, dtrain with dynamic padding, Trainer + DataCollatorForSeq2Seq (dynamic
   padding, group_by_length off), Trainer + DataCollatorWithFlattening (padding-free: position_ids, no
   mask), and a pad-to-max_length tutorial loop (model(**batch), mask included). Goals: dtrain packing
   >= 1.5x Trainer dynamic, >= 2x pad-to-max, >= 1x Trainer flattening.
3. memory: (i) optimizer-state bytes/param for adamw, adamw_8bit, adamw_8bit_ao (the first metrics row's
   optim_state_bytes_per_param; torchao's step runs eagerly here, TORCHDYNAMO_DISABLE=1, which does not
   change its state bytes and saves its ~30 s compile); (ii) per-rank bytes of parameters + gradients +
   optimizer state under ddp, fsdp, zero1, zero2, zero3 on 2 CPU ranks against the ZeRO paper's fp32 Adam
   formula (4+4+8 bytes/param; see bench/memprobe.py for exactly what is counted); (iii) peak memory
   with and without --train.loss_chunk_size on a 128k-vocabulary model (all rows near max_length).
4. startup: seconds from launch to the first optimizer step of the default run (`python dtrain/train.py
   --train.max_steps 1 --eval.num_generate 0 --eval.num_samples 0 --log.progress_bar false`: the
   embedded data and model as shipped; only the end-of-run generation is off, after the first step
   anyway), taken when metrics.jsonl gets its first row; the whole `--print_config` process; and the
   heavy modules a `--print_config` process (and, in full mode, that training run) imports, from
   `python -X importtime`.
5. data: `dtrain prepare` against the run_clm tokenize + group_texts recipe, start-up and per-rank peak
   RSS of 2-rank runs on prepared 1x and 10x corpora, and (full mode) a 100M-token corpus; see
   bench/data_bench.py.
Quick mode: 1 repeat, 2-3 steps per case, memory profiles ddp and zero3 only, no import timing of the
training run.

GPU mode (--gpu): a ~1B Llama (hidden 2048, 16 layers, 16 heads, intermediate 5632, vocab 32000,
random init, saved in bf16), bf16 mixed precision, max_length 2048: dtrain with packing,
flash_attention_2 when flash_attn imports (else sdpa), fused AdamW, --train.compile true, against
Trainer with DataCollatorWithFlattening; tokens/s and MFU (torchtitan's FLOPs/token: 6 x (params -
embedding params) + 12 x layers x heads x head_dim x seq_len, over 989 TFLOP/s for H100 SXM/H200, 756
H100 PCIe, 312 A100). Both load the fp32 master weights and train under bf16 autocast with fused AdamW
and the same attention kernel; the Trainer is not compiled (its flattened batches change length every
step). Goals: MFU >= 45%, >= 1.3x Trainer tokens/s. Then short bf16 and fp16 dtrain runs with
--optim.name adamw_8bit, checked for finite, falling loss. Each dtrain run's final checkpoint and export
(GBs) are deleted once its metrics are read, unless --keep.

Quick mode never judges speed; it fails (exit 1) only when a case fails to run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:  # `python bench/run.py`: import the dtrain package of this checkout
    sys.path.insert(0, str(REPO))

TRAIN = REPO / "dtrain" / "train.py"
CASES = BENCH / "cases.py"
MEMPROBE = BENCH / "memprobe.py"
LOSS_CHUNK_SIZE = 256  # tokens per chunk of the memory-lean loss (section 3 iii)
OPTIM = {"lr": 1e-3, "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "warmup_steps": 2}
# dense bf16 peak FLOP/s by device name, first match wins
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
HEAVY_MODULES = (
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "deepspeed",
    "bitsandbytes",
    "torchao",
    "tensorboard",
    "wandb",
    "jsonargparse",
    "yaml",
)


# --------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    mode: str
    max_length: int = 256
    train_examples: int = 2000
    sections: tuple[str, ...] = ("overhead", "throughput", "memory", "startup", "data")
    # (batch, warm-up steps, measured steps, log every, repeats)
    overhead: tuple[int, int, int, int, int] = (8, 20, 300, 20, 5)
    throughput: tuple[int, int, int, int, int] = (16, 3, 24, 3, 5)
    optimizers: tuple[str, ...] = ("adamw", "adamw_8bit", "adamw_8bit_ao")
    optim_steps: int = 3
    profiles: tuple[str, ...] = ("ddp", "fsdp", "zero1", "zero2", "zero3")
    bigvocab: tuple[int, int] = (8, 3)  # batch, steps
    startup_repeats: int = 3
    train_imports: bool = True  # also -X importtime on the training run (full mode)
    timeout: int = 900
    threads: int | None = None  # OMP_NUM_THREADS of one-process cases; None: all cores (GPU: untouched)
    models: dict = field(default_factory=dict)
    gpu: dict = field(default_factory=dict)


CPU_MODELS = {
    "tiny": {"hidden": 32, "intermediate": 64, "layers": 2, "heads": 2},  # overhead: the loop shows
    "bench": {"hidden": 256, "intermediate": 1024, "layers": 4, "heads": 4},  # attention/MLP dominate
    "bigvocab": {"hidden": 64, "intermediate": 256, "layers": 2, "heads": 2, "vocab_size": 128256},
}

PLANS = {
    "full": Plan("full", models=CPU_MODELS),
    "quick": Plan(
        "quick",
        train_examples=400,
        overhead=(8, 2, 3, 1, 1),
        throughput=(8, 1, 2, 1, 1),
        optim_steps=2,
        profiles=("ddp", "zero3"),
        bigvocab=(8, 2),
        startup_repeats=1,
        train_imports=False,
        timeout=300,
        threads=1,  # judges nothing: one thread is steadier on a busy CI runner than two spinning ones
        models=CPU_MODELS,
    ),
    "gpu": Plan(
        "gpu",
        max_length=2048,
        train_examples=3000,
        sections=("gpu",),
        timeout=600,
        models={
            "gpu1b": {
                "hidden": 2048,
                "intermediate": 5632,
                "layers": 16,
                "heads": 16,
                "vocab_size": 32000,
                "save_dtype": "bfloat16",
            }
        },
        # tokens per optimizer step, warm-up (compile), measured steps, log every; 8-bit runs: steps, rows
        gpu={"tokens_per_step": 12288, "warmup": 10, "measure": 30, "log_every": 10, "check_steps": 16},
    ),
}


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


class CaseError(Exception):
    pass


@dataclass
class Proc:
    rc: int
    seconds: float
    peak_rss_mib: float
    log: Path

    def tail(self, n: int = 6) -> str:
        lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
        return " | ".join(lines[-n:])[-1200:]


def subprocess_env(threads: int | None = None, **extra: str) -> dict:
    env = dict(os.environ)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
        DTRAIN_TRACEBACK="1",
    )
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra)
    return env


def run_process(cmd: list[str], log: Path, env: dict, timeout: float, watch=None) -> Proc:
    """Run `cmd` in its own process group; wait4 gives its peak RSS (its own, or its largest reaped
    descendant's). `watch(elapsed)` is called every 10 ms while it runs."""
    import subprocess

    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        child = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.perf_counter() - start
            if watch is not None:
                watch(elapsed)
            if elapsed > timeout:
                status, usage = _kill_group(child.pid)
                fh.write(f"\nbench: killed after {timeout:.0f} s\n")
                break
            time.sleep(0.01)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return Proc(child.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024.0, log)


def _kill_group(pid: int):
    """SIGTERM the case's process group (its own session), SIGKILL what is left after 10 s; returns
    wait4's (status, usage) of the case's process."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.time() + 10.0
    reaped = None
    while reaped is None and time.time() < deadline:
        got, status, usage = os.wait4(pid, os.WNOHANG)
        reaped = (status, usage) if got else None
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):  # ranks or workers still alive in the group
        os.killpg(pid, signal.SIGKILL)
    if reaped is None:
        _, status, usage = os.wait4(pid, 0)
        reaped = (status, usage)
    return reaped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# The context every case reads
# --------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    plan: Plan
    work: Path
    prep: dict
    threads: int  # OMP_NUM_THREADS of single-process cases (None: torch's default)
    overhead_threads: int | None = 1
    keep: bool = False
    counter: int = 0

    @property
    def paths(self) -> dict:
        return self.prep["paths"]

    def model(self, name: str) -> str:
        return self.prep["models"][name]["path"]

    def fresh(self, name: str) -> Path:
        self.counter += 1
        path = self.work / "runs" / f"{self.counter:03d}-{re.sub(r'[^A-Za-z0-9]+', '_', name)}"
        path.mkdir(parents=True)
        return path

    @property
    def gpu(self) -> bool:
        return self.plan.mode == "gpu"


def dtrain_args(
    ctx: Ctx,
    model: str,
    steps: int,
    batch: int,
    log_every: int,
    data: str = "train",
    precision: str | None = None,
) -> list[str]:
    """The training flags every dtrain case shares (run_dtrain adds --output_dir)."""
    path = ctx.model(model)
    o = OPTIM
    precision = precision or ("bf16" if ctx.gpu else "no")
    return [
        "--model.name_or_path",
        path,
        "--model.tokenizer",
        path,
        "--data.path",
        ctx.paths[data],
        "--data.eval_path",
        ctx.paths["eval"],
        "--data.template",
        "chat",
        "--data.max_length",
        str(ctx.plan.max_length),
        "--train.max_steps",
        str(steps),
        "--train.per_device_batch_size",
        str(batch),
        "--train.seed",
        "42",
        "--train.max_grad_norm",
        "1.0",
        "--train.mixed_precision",
        precision,
        "--optim.lr",
        str(o["lr"]),
        "--optim.weight_decay",
        str(o["weight_decay"]),
        "--optim.beta1",
        str(o["beta1"]),
        "--optim.beta2",
        str(o["beta2"]),
        "--optim.eps",
        str(o["eps"]),
        "--optim.scheduler",
        "cosine",
        "--optim.warmup_steps",
        str(min(o["warmup_steps"], steps - 1)),
        "--eval.steps",
        "0",
        "--eval.num_generate",
        "0",
        "--eval.num_samples",
        "0",
        "--checkpoint.save_steps",
        "0",
        "--log.every_steps",
        str(log_every),
        "--log.progress_bar",
        "false",
    ]


def read_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_rows(out: Path) -> list[dict]:
    return [r for r in read_rows(out) if "tokens_per_sec" in r]


def interval_stats(rows: list[dict], warmup: int) -> dict:
    """Seconds and real tokens of the log intervals after step `warmup`, from metrics.jsonl rows."""
    seconds = tokens = positions = 0.0
    steps = 0
    prev_tokens, prev_step = None, 0
    for r in rows:
        delta = r["tokens"] - (prev_tokens or 0)
        if r["step"] > warmup and prev_tokens is not None and r.get("tokens_per_sec"):
            seconds += delta / r["tokens_per_sec"]
            tokens += delta
            positions += delta / max(1e-12, 1.0 - (r.get("padding_fraction") or 0.0))
            steps += r["step"] - prev_step
        prev_tokens, prev_step = r["tokens"], r["step"]
    if not steps or not seconds:
        raise CaseError(f"metrics.jsonl has no train row after warm-up step {warmup}")
    return {
        "measured_steps": steps,
        "seconds": seconds,
        "step_time_s": seconds / steps,
        "tokens": tokens,
        "tokens_per_sec": tokens / seconds,
        "tokens_per_step": tokens / steps,
        "padding_fraction": 1.0 - tokens / positions if positions else None,
    }


def logged(rows: list[dict], key: str, how=max):
    values = [r[key] for r in rows if r.get(key) is not None]
    return how(values) if values else None


def run_dtrain(ctx: Ctx, name: str, args: list[str], warmup: int, env_extra: dict | None = None) -> dict:
    out = ctx.fresh(name)
    argv = [*args, "--output_dir", str(out)]
    proc = run_process(
        [sys.executable, str(TRAIN), *argv],
        out / "log.txt",
        subprocess_env(ctx.threads, HF_DATASETS_CACHE=str(ctx.work / "hf_datasets"), **(env_extra or {})),
        ctx.plan.timeout,
    )
    if proc.rc != 0:
        raise CaseError(f"dtrain exited {proc.rc}: {proc.tail()} (log {proc.log})")
    rows = train_rows(out)
    result = interval_stats(rows, warmup) if warmup is not None else {}
    first = rows[0] if rows else {}
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    result.update(
        peak_rss_mib=proc.peak_rss_mib,
        wall_s=proc.seconds,
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
        losses=losses,
        mfu_logged=logged([r for r in rows if r["step"] > (warmup or 0)], "mfu", statistics.median),
        peak_memory_mib_logged=logged(rows, "peak_memory_mib"),
        optim_state_bytes_per_param=first.get("optim_state_bytes_per_param"),
        optim_state_dtypes=first.get("optim_state_dtypes"),
        output_dir=str(out),
    )
    if not ctx.keep:  # the final checkpoint and export: GBs per run in GPU mode, never read here
        for heavy in ("checkpoints", "final"):
            shutil.rmtree(out / heavy, ignore_errors=True)
    return result


def run_case_process(ctx: Ctx, kind: str, name: str, spec: dict) -> dict:
    out = ctx.fresh(name)
    spec = {**spec, "output_dir": str(out / "trainer")}
    (out / "spec.json").write_text(json.dumps(spec, indent=1))
    proc = run_process(
        [sys.executable, str(CASES), kind, str(out / "spec.json"), str(out / "result.json")],
        out / "log.txt",
        subprocess_env(ctx.threads),
        ctx.plan.timeout,
    )
    if proc.rc != 0 or not (out / "result.json").is_file():
        raise CaseError(f"{kind} exited {proc.rc}: {proc.tail()} (log {proc.log})")
    result = json.loads((out / "result.json").read_text())
    result.update(peak_rss_mib=proc.peak_rss_mib, wall_s=proc.seconds)
    return result


def loop_spec(ctx: Ctx, model: str, batch: int, warmup: int, measure: int, log_every: int, pad: str) -> dict:
    return {
        "model": ctx.model(model),
        "ordered": ctx.paths["ordered"],
        "steps": warmup + measure,
        "warmup": warmup,
        "batch": batch,
        "seed": 42,
        "pad": pad,
        "max_length": ctx.plan.max_length,
        "log_every": log_every,
        "max_grad_norm": 1.0,
        "optim": OPTIM,
        "mixed_precision": "bf16" if ctx.gpu else "no",
    }


def packed_rows(ctx: Ctx, examples: int) -> int:
    """Packed rows of max_length holding about as many tokens as `examples` average examples."""
    return max(1, round(examples * ctx.prep["lengths"]["mean"] / ctx.plan.max_length))


# --------------------------------------------------------------------------------------------
# Cases and sections
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    key: str
    label: str
    run: object = None  # callable(repeat) -> dict; None: skipped
    note: str = ""
    status: str = "ok"
    repeats: list = field(default_factory=list)
    error: str = ""

    def summary(self, keys=("tokens_per_sec", "step_time_s")) -> dict:
        out = {}
        for key in keys:
            values = [r[key] for r in self.repeats if r.get(key) is not None]
            if values:
                out[key] = statistics.median(values)
                out[key + "_spread"] = (
                    (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else 0.0
                )
        for key in (
            "tokens_per_step",
            "padding_fraction",
            "peak_rss_mib",
            "mfu_logged",
            "mfu",
            "peak_memory_mib_logged",
        ):
            values = [r[key] for r in self.repeats if r.get(key) is not None]
            if values:
                out[key] = statistics.median(values)
        return out

    def as_json(self) -> dict:
        return {
            "label": self.label,
            "status": self.status,
            "note": self.note,
            "error": self.error,
            "repeats": self.repeats,
            "summary": self.summary(),
        }


def run_alternately(cases: list[Case], repeats: int, say) -> None:
    for r in range(repeats):
        for case in cases:
            if case.run is None or case.status == "failed":
                continue
            say(f"  {case.label} (repeat {r + 1}/{repeats})")
            try:
                case.repeats.append(case.run(r))
            except CaseError as exc:
                case.status, case.error = "failed", str(exc)
                say(f"    failed: {exc}")


def ratio(a: Case, b: Case, key: str) -> float | None:
    x, y = a.summary().get(key), b.summary().get(key)
    return x / y if x and y else None


def goal(name: str, value: float | None, target: str, met: bool | None, judged: bool) -> dict:
    return {
        "goal": name,
        "value": value,
        "target": target,
        "met": met if judged and value is not None else None,
    }


# 1. overhead -------------------------------------------------------------------------------


def section_overhead(ctx: Ctx, say) -> dict:
    saved, ctx.threads = ctx.threads, ctx.overhead_threads
    try:
        return _overhead(ctx, say)
    finally:
        ctx.threads = saved


def _overhead(ctx: Ctx, say) -> dict:
    batch, warmup, measure, log_every, repeats = ctx.plan.overhead
    steps = warmup + measure
    cases = [
        Case(
            "dtrain",
            "dtrain (CLI, tiny model)",
            lambda r: run_dtrain(
                ctx, "overhead-dtrain", dtrain_args(ctx, "tiny", steps, batch, log_every), warmup
            ),
        ),
        Case(
            "minimal",
            "minimal Accelerate loop",
            lambda r: run_case_process(
                ctx,
                "loop",
                "overhead-minimal",
                loop_spec(ctx, "tiny", batch, warmup, measure, log_every, "longest"),
            ),
        ),
    ]
    run_alternately(cases, repeats, say)
    judged = ctx.plan.mode != "quick"
    value = ratio(cases[0], cases[1], "step_time_s")
    goals = [
        goal("dtrain step time / minimal loop", value, "<= 1.03", value is not None and value <= 1.03, judged)
    ]
    return {
        "title": f"1. Loop overhead (tiny Llama {ctx.prep['models']['tiny']['params'] / 1e3:.0f}k params, "
        f"batch {batch}, {measure} measured steps after {warmup}, {repeats} repeats, "
        f"OMP_NUM_THREADS={ctx.threads or 'default'})",
        "cases": cases,
        "goals": goals,
    }


# 2. throughput -----------------------------------------------------------------------------


def section_throughput(ctx: Ctx, say) -> dict:
    batch, warmup, measure, log_every, repeats = ctx.plan.throughput
    steps = warmup + measure
    rows = packed_rows(ctx, batch)

    def dtrain_case(packing: bool):
        def go(r):
            args = dtrain_args(ctx, "bench", steps, rows if packing else batch, log_every)
            if packing:
                args += ["--data.packing", "true"]
            return run_dtrain(ctx, "tp-dtrain-packing" if packing else "tp-dtrain-dynamic", args, warmup)

        return go

    def other(kind: str, name: str, **extra):
        spec = {
            **loop_spec(ctx, "bench", batch, warmup, measure, log_every, extra.pop("pad", "longest")),
            **extra,
        }
        return lambda r: run_case_process(ctx, kind, name, spec)

    cases = [
        Case("dtrain_packing", f"dtrain --data.packing true ({rows} rows/step)", dtrain_case(True)),
        Case("dtrain_dynamic", f"dtrain dynamic padding ({batch} ex/step)", dtrain_case(False)),
        Case(
            "trainer_dynamic",
            "Trainer + DataCollatorForSeq2Seq",
            other("trainer", "tp-trainer-dynamic", collator="pad"),
        ),
        Case(
            "trainer_flatten",
            "Trainer + DataCollatorWithFlattening",
            other("trainer", "tp-trainer-flatten", collator="flatten"),
        ),
        Case("loop_pad_max", "loop, pad to max_length", other("loop", "tp-loop-padmax", pad="max_length")),
    ]
    run_alternately(cases, repeats, say)
    judged = ctx.plan.mode != "quick"
    by = {c.key: c for c in cases}
    goals = []
    for other_key, target in (("trainer_dynamic", 1.5), ("loop_pad_max", 2.0), ("trainer_flatten", 1.0)):
        value = ratio(by["dtrain_packing"], by[other_key], "tokens_per_sec")
        goals.append(
            goal(
                f"dtrain packing / {by[other_key].label}",
                value,
                f">= {target}",
                value is not None and value >= target,
                judged,
            )
        )
    m = ctx.prep["models"]["bench"]
    return {
        "title": f"2. Throughput, real (non-padding) tokens/s (Llama hidden {m['hidden']}, {m['layers']} layers, "
        f"{m['params'] / 1e6:.1f}M params; {batch} examples/step, max_length {ctx.plan.max_length}; "
        f"{measure} measured steps after {warmup}, {repeats} repeats)",
        "cases": cases,
        "goals": goals,
    }


# 3. memory ---------------------------------------------------------------------------------


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def section_optim_state(ctx: Ctx, say) -> dict:
    steps = ctx.plan.optim_steps
    needs = {"adamw_8bit": "bitsandbytes", "adamw_8bit_ao": "torchao"}
    cases = []
    for name in ctx.plan.optimizers:
        env = {"TORCHDYNAMO_DISABLE": "1"} if name == "adamw_8bit_ao" else None

        def go(r, name=name, env=env):
            args = dtrain_args(ctx, "bench", steps, 4, 1) + ["--optim.name", name]
            return run_dtrain(ctx, f"optim-{name}", args, None, env)

        case = Case(name, f"--optim.name {name}", go)
        if name in needs and not have(needs[name]):
            case.run, case.status, case.note = None, "skipped", f"{needs[name]} not installed"
        cases.append(case)
    run_alternately(cases, 1, say)
    return {
        "title": "3(i). Optimizer state, bytes per parameter (first metrics row, hidden-256 model)",
        "cases": cases,
        "goals": [],
    }


def zero_formula(profile: str, n: int) -> float:
    """Bytes per parameter per rank for fp32 Adam (params 4, grads 4, optimizer 8), N ranks."""
    return {"ddp": 16.0, "zero1": 4 + 4 + 8 / n, "zero2": 4 + 12 / n}.get(profile, 16.0 / n)


def section_profiles(ctx: Ctx, say) -> dict:
    from dtrain.launch import TRAIN_SCRIPT, build_command, load_profile, preflight

    world = 2
    cases = []
    for profile in ctx.plan.profiles:

        def go(r, profile=profile):
            out = ctx.fresh(f"mem-{profile}")
            args = [*dtrain_args(ctx, "bench", 2, 2, 1), "--output_dir", str(out)]
            prof = load_profile(profile)
            from dtrain.config import parse_config

            problems = preflight(prof, parse_config(args), world, True, 0, False)
            if problems:
                raise CaseError("; ".join(problems))
            cmd, env = build_command(prof, world, 1, 0, f"127.0.0.1:{free_port()}", True, args)
            cmd = [str(MEMPROBE) if part == str(TRAIN_SCRIPT) else part for part in cmd]
            env = subprocess_env(
                1, **env, BENCH_MEMPROBE_OUT=str(out / "mem"), HF_DATASETS_CACHE=str(ctx.work / "hf_datasets")
            )
            proc = run_process(cmd, out / "log.txt", env, ctx.plan.timeout)
            ranks = (
                [json.loads(p.read_text()) for p in sorted((out / "mem").glob("rank*.json"))]
                if (out / "mem").is_dir()
                else []
            )
            if proc.rc != 0 or len(ranks) != world:
                raise CaseError(f"{profile} exited {proc.rc}: {proc.tail()} (log {proc.log})")
            worst = max(ranks, key=lambda x: x["params"] + x["grads"] + x["optim_state"])
            n = worst["num_params"]
            measured = worst["params"] + worst["grads"] + worst["optim_state"]
            formula = zero_formula(profile, world) * n
            return {
                "ranks": ranks,
                "num_params": n,
                "params_per_param": worst["params"] / n,
                "grads_per_param": worst["grads"] / n,
                "state_per_param": worst["optim_state"] / n,
                "measured_bytes": measured,
                "formula_bytes": formula,
                "ratio": measured / formula,
                "master_bytes": worst["master"],
                "buffer_bytes": worst["buffers"],
                "peak_rss_mib": max(x["peak_rss_mib"] for x in ranks),
                "wall_s": proc.seconds,
            }

        case = Case(profile, profile, go)
        if profile.startswith("zero") and not have("deepspeed"):
            case.run, case.status, case.note = None, "skipped", "deepspeed not installed"
        cases.append(case)
    run_alternately(cases, 1, say)
    goals = []  # a byte count, not a speed: judged in every mode
    for c in cases:
        if c.repeats:
            value = c.repeats[-1]["ratio"]
            goals.append(
                goal(f"{c.key}: measured / formula", value, "within 10%", abs(value - 1) <= 0.10, True)
            )
    notes = [
        "params, grads, state: bytes per parameter held by the rank with the most; total = their sum "
        "(gradients: the larger of end of backward and just before the update); formula: ZeRO paper, fp32 Adam (4 + 4 + 8 bytes/param)",
        "+ master: DeepSpeed's separate fp32 copy of the rank's partition; + buckets: DeepSpeed reduce "
        "buckets alive at those moments (DDP's own buckets live in C++ and are not counted)",
    ]
    for c in cases:
        r = c.repeats[-1] if c.repeats else {}
        if c.key == "zero1" and r and r["grads_per_param"] < 4 * 0.9:
            notes.append(
                f"zero1: DeepSpeed reduces stage-1 gradients through its buckets ({r['buffer_bytes'] / 2**20:.0f} "
                "MiB here) and keeps only the rank's gradient partition at the update, so it measures "
                "like stage 2, below the formula's full 4 bytes/param of gradients"
            )
    return {
        "notes": notes,
        "title": f"3(ii). Per-rank parameters + gradients + optimizer state, {world} CPU ranks, fp32 AdamW "
        f"(hidden-256 model, {ctx.prep['models']['bench']['params'] / 1e6:.2f}M params)",
        "cases": cases,
        "goals": goals,
    }


def section_loss_memory(ctx: Ctx, say) -> dict:
    batch, steps = ctx.plan.bigvocab

    def go(chunk: int | None):
        def run(r):
            args = dtrain_args(ctx, "bigvocab", steps, batch, 1, data="long")
            if chunk is not None:
                args += ["--train.loss_chunk_size", str(chunk)]
            return run_dtrain(ctx, f"loss-chunk-{chunk or 0}", args, 1)

        return run

    cases = [
        Case("full_logits", "loss over full logits (default)", go(None)),
        Case("chunked", f"--train.loss_chunk_size {LOSS_CHUNK_SIZE}", go(LOSS_CHUNK_SIZE)),
    ]
    run_alternately(cases, 1, say)
    m = ctx.prep["models"]["bigvocab"]
    return {
        "title": f"3(iii). Peak memory, {m['vocab_size']:,}-token vocabulary (hidden {m['hidden']}, "
        f"{m['params'] / 1e6:.1f}M params), {batch} rows near {ctx.plan.max_length} tokens",
        "cases": cases,
        "goals": [],
    }


# 4. startup --------------------------------------------------------------------------------


def parse_importtime(text: str) -> dict:
    """`python -X importtime` output -> {top-level package: {"seconds": cumulative seconds of its first
    import, "via": the outermost module whose import pulled it in (None: imported from a function call
    at run time, or directly)}}."""
    lines = []
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|( *)(\S+)", line)
        if m:
            lines.append((len(m.group(3)), m.group(4), int(m.group(2)) / 1e6))
    seen: dict[str, dict] = {}
    for i, (depth, name, cumulative) in enumerate(lines):
        top = name.split(".")[0]
        if name != top or top in seen:
            continue
        via = None  # importtime prints children before their parent, one level deeper
        for d, parent, _ in lines[i + 1 :]:
            if d < depth:
                via, depth = parent, d
        seen[top] = {"seconds": cumulative, "via": via}
    return seen


def section_startup(ctx: Ctx, say) -> dict:
    def first_step(r):
        out = ctx.fresh("startup-default")
        metrics = out / "metrics.jsonl"
        hit = {}

        def watch(elapsed):
            if "t" not in hit and metrics.is_file() and '"loss"' in metrics.read_text():
                hit["t"] = elapsed

        args = [
            "--train.max_steps",
            "1",
            "--eval.num_generate",
            "0",
            "--eval.num_samples",
            "0",
            "--log.progress_bar",
            "false",
            "--output_dir",
            str(out),
        ]
        proc = run_process(
            [sys.executable, str(TRAIN), *args],
            out / "log.txt",
            subprocess_env(ctx.threads, HF_DATASETS_CACHE=str(out / "hf_datasets")),
            ctx.plan.timeout,
            watch,
        )
        if proc.rc != 0 or "t" not in hit:
            raise CaseError(f"default run exited {proc.rc}: {proc.tail()} (log {proc.log})")
        return {"seconds": hit["t"], "wall_s": proc.seconds, "peak_rss_mib": proc.peak_rss_mib}

    def print_config(r):
        out = ctx.fresh("startup-print-config")
        proc = run_process(
            [sys.executable, str(TRAIN), "--print_config"], out / "log.txt", subprocess_env(ctx.threads), 120
        )
        if proc.rc != 0:
            raise CaseError(f"--print_config exited {proc.rc}: {proc.tail()}")
        return {"seconds": proc.seconds, "wall_s": proc.seconds, "peak_rss_mib": proc.peak_rss_mib}

    cases = [
        Case("first_step", "launch -> first optimizer step (default run, max_steps 1)", first_step),
        Case("print_config", "python dtrain/train.py --print_config", print_config),
    ]
    run_alternately(cases, ctx.plan.startup_repeats, say)

    imports = {}
    runs = [("print_config", ["--print_config"])]
    if ctx.plan.train_imports:
        runs.append(
            (
                "train",
                [
                    "--train.max_steps",
                    "1",
                    "--eval.num_generate",
                    "0",
                    "--eval.num_samples",
                    "0",
                    "--log.progress_bar",
                    "false",
                ],
            )
        )
    for what, args in runs:
        say(f"  -X importtime {what}")
        out = ctx.fresh(f"imports-{what}")
        if what == "train":
            args = [*args, "--output_dir", str(out)]
        proc = run_process(
            [sys.executable, "-X", "importtime", str(TRAIN), *args],
            out / "log.txt",
            subprocess_env(ctx.threads, HF_DATASETS_CACHE=str(out / "hf_datasets")),
            ctx.plan.timeout,
        )
        imports[what] = (
            parse_importtime(proc.log.read_text(errors="replace")) if proc.rc == 0 else {"error": proc.tail()}
        )
    notes = []
    for mod in ("deepspeed", "bitsandbytes", "torchao", "tensorboard", "wandb"):
        hit = imports.get("train", {}).get(mod)
        if isinstance(hit, dict):
            how = f"through {hit['via']}" if hit["via"] else "lazily, from a function call"
            notes.append(
                f"the default single-process run imports {mod} ({hit['seconds']:.2f} s, {how}) without using it"
            )
    return {
        "title": f"4. Start-up ({ctx.plan.startup_repeats} repeats)",
        "cases": cases,
        "goals": [],
        "imports": imports,
        "notes": notes,
    }


# GPU ---------------------------------------------------------------------------------------


def peak_flops(device: str) -> float | None:
    return next((f for key, f in PEAK_FLOPS if key in device), None)


def section_gpu(ctx: Ctx, say) -> dict:
    g = ctx.plan.gpu
    warmup, measure, log_every = g["warmup"], g["measure"], g["log_every"]
    steps = warmup + measure
    mean = ctx.prep["lengths"]["mean"]
    examples = max(1, round(g["tokens_per_step"] / mean))
    rows = packed_rows(ctx, examples)
    attn = "flash_attention_2" if have("flash_attn") else "sdpa"
    m = ctx.prep["models"]["gpu1b"]
    flops_per_token = (
        6 * (m["params"] - m["embedding_params"])
        + 12 * m["layers"] * m["heads"] * m["head_dim"] * ctx.plan.max_length
    )
    peak = peak_flops(ctx.prep["device"])

    def with_mfu(result: dict) -> dict:
        result["flops_per_token"] = flops_per_token
        result["mfu"] = result["tokens_per_sec"] * flops_per_token / peak if peak else None
        return result

    def dtrain_run(r):
        args = dtrain_args(ctx, "gpu1b", steps, rows, log_every)
        args += ["--model.attn_implementation", attn, "--data.packing", "true", "--train.compile", "true"]
        return with_mfu(run_dtrain(ctx, "gpu-dtrain", args, warmup))

    def trainer_run(r):
        spec = {
            **loop_spec(ctx, "gpu1b", examples, warmup, measure, log_every, "longest"),
            "collator": "flatten",
            "attn_implementation": attn,
        }
        return with_mfu(run_case_process(ctx, "trainer", "gpu-trainer", spec))

    cases = [
        Case("dtrain", f"dtrain (packing {rows} rows, {attn}, compile)", dtrain_run),
        Case("trainer", f"Trainer + DataCollatorWithFlattening ({examples} ex, {attn})", trainer_run),
    ]
    run_alternately(cases, 1, say)

    def check_run(precision: str):
        def go(r):
            n = g["check_steps"]
            args = dtrain_args(ctx, "gpu1b", n, max(1, rows // 3), 2, precision=precision)
            args += ["--optim.name", "adamw_8bit", "--data.packing", "true"]
            args += ["--model.attn_implementation", attn]
            result = run_dtrain(ctx, f"gpu-8bit-{precision}", args, None)
            losses = result["losses"]
            k = max(1, len(losses) // 3)
            result["finite"] = bool(losses) and all(math.isfinite(x) for x in losses)
            result["falling"] = bool(losses) and sum(losses[-k:]) / k < sum(losses[:k]) / k
            if not (result["finite"] and result["falling"]):
                raise CaseError(f"{precision} adamw_8bit losses not finite and falling: {losses}")
            return result

        return go

    checks = [
        Case("bf16_8bit", "dtrain bf16, adamw_8bit", check_run("bf16")),
        Case("fp16_8bit", "dtrain fp16, adamw_8bit", check_run("fp16")),
    ]
    run_alternately(checks, 1, say)
    d = cases[0].summary()
    mfu = d.get("mfu_logged") or d.get("mfu")
    tp = ratio(cases[0], cases[1], "tokens_per_sec")
    goals = [
        goal("dtrain MFU", mfu, ">= 45%", mfu is not None and mfu >= 0.45, True),
        goal("dtrain / Trainer tokens/s", tp, ">= 1.3", tp is not None and tp >= 1.3, True),
    ]
    return {
        "title": f"GPU: {m['params'] / 1e9:.2f}B-param Llama, bf16, max_length {ctx.plan.max_length}, "
        f"~{g['tokens_per_step']} tokens/step, {measure} measured steps after {warmup} ({ctx.prep['device']}, "
        f"peak {peak / 1e12 if peak else 0:.0f} TFLOP/s)",
        "cases": cases,
        "checks": checks,
        "goals": goals,
        "flops_per_token": flops_per_token,
    }


import data_bench  # noqa: E402  (section 5, bench/data_bench.py: it reads this module's Case, run_process, ...)

SECTIONS = {
    "overhead": [section_overhead],
    "throughput": [section_throughput],
    "memory": [section_optim_state, section_profiles, section_loss_memory],
    "startup": [section_startup],
    "gpu": [section_gpu],
    "data": data_bench.sections(sys.modules[__name__]),
}


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def fmt(x, spec: str = ".0f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def status_text(c: Case) -> str:
    if c.status == "failed":
        return f"FAILED: {c.error[:160]}"
    if c.status == "ok":
        return c.note
    return f"{c.status}: {c.note}" if c.note else c.status


def print_section(console, sec: dict) -> None:
    from rich.table import Table

    kind = sec["kind"]
    t = Table(title=sec["title"], title_justify="left", show_lines=False)
    cases: list[Case] = sec["cases"]
    if kind in ("section_overhead", "section_throughput", "section_gpu"):
        base = {c.key: c for c in cases}.get("trainer_dynamic")
        cols = ["case", "real tokens/s", "±", "step s", "tokens/step", "padding", "peak RSS MiB"]
        if kind == "section_throughput":
            cols.insert(3, "vs Trainer dyn")
        if kind == "section_gpu":
            cols += ["MFU", "MFU logged", "peak GPU MiB"]
        for col in [*cols, "note"]:
            t.add_column(col, justify="left" if col in ("case", "note") else "right")
        for c in cases:
            s = c.summary()
            row = [
                c.label,
                fmt(s.get("tokens_per_sec")),
                fmt(s.get("tokens_per_sec_spread"), ".0%"),
                fmt(s.get("step_time_s"), ".4f"),
                fmt(s.get("tokens_per_step")),
                fmt(s.get("padding_fraction"), ".0%"),
                fmt(s.get("peak_rss_mib")),
            ]
            if kind == "section_throughput":
                r = ratio(c, base, "tokens_per_sec") if base else None
                row.insert(3, fmt(r, ".2f", "x"))
            if kind == "section_gpu":
                row += [
                    fmt(s.get("mfu"), ".1%"),
                    fmt(s.get("mfu_logged"), ".1%"),
                    fmt(s.get("peak_memory_mib_logged")),
                ]
            t.add_row(*row, status_text(c))
    elif kind == "section_optim_state":
        for col in ("optimizer", "state bytes/param", "state dtypes", "note"):
            t.add_column(col)
        for c in cases:
            r = c.repeats[-1] if c.repeats else {}
            t.add_row(
                c.label,
                fmt(r.get("optim_state_bytes_per_param"), ".2f"),
                r.get("optim_state_dtypes") or "-",
                status_text(c),
            )
    elif kind == "section_profiles":
        cols = [
            "profile",
            "params B/p",
            "grads B/p",
            "state B/p",
            "total MiB/rank",
            "formula MiB",
            "measured/formula",
            "+ master MiB",
            "+ buckets MiB",
            "peak RSS MiB",
            "note",
        ]
        for col in cols:
            t.add_column(col, justify="left" if col in ("profile", "note") else "right")
        for c in cases:
            r = c.repeats[-1] if c.repeats else {}
            mib = 2**20
            t.add_row(
                c.label,
                fmt(r.get("params_per_param"), ".2f"),
                fmt(r.get("grads_per_param"), ".2f"),
                fmt(r.get("state_per_param"), ".2f"),
                fmt(r.get("measured_bytes", 0) / mib if r else None, ".1f"),
                fmt(r.get("formula_bytes", 0) / mib if r else None, ".1f"),
                fmt(r.get("ratio"), ".3f"),
                fmt(r.get("master_bytes", 0) / mib if r else None, ".1f"),
                fmt(r.get("buffer_bytes", 0) / mib if r else None, ".1f"),
                fmt(r.get("peak_rss_mib")),
                status_text(c),
            )
    elif kind == "section_loss_memory":
        for col in ("case", "peak RSS MiB", "peak_memory_mib (logged)", "real tokens/s", "note"):
            t.add_column(col, justify="left" if col in ("case", "note") else "right")
        for c in cases:
            s = c.summary()
            t.add_row(
                c.label,
                fmt(s.get("peak_rss_mib")),
                fmt(s.get("peak_memory_mib_logged")),
                fmt(s.get("tokens_per_sec")),
                status_text(c),
            )
    elif kind in data_bench.KINDS:
        data_bench.fill_table(t, sec, fmt, status_text)
    elif kind == "section_startup":
        for col in ("what", "seconds (median)", "±", "peak RSS MiB", "note"):
            t.add_column(col, justify="left" if col in ("what", "note") else "right")
        for c in cases:
            s = c.summary(keys=("seconds",))
            t.add_row(
                c.label,
                fmt(s.get("seconds"), ".2f"),
                fmt(s.get("seconds_spread"), ".0%"),
                fmt(s.get("peak_rss_mib")),
                status_text(c),
            )
    console.print(t)
    if kind == "section_gpu":
        c = Table(title="GPU: adamw_8bit short runs", title_justify="left")
        for col in ("run", "first loss", "last loss", "finite", "falling", "note"):
            c.add_column(col)
        for case in sec["checks"]:
            r = case.repeats[-1] if case.repeats else {}
            c.add_row(
                case.label,
                fmt(r.get("loss_first"), ".3f"),
                fmt(r.get("loss_last"), ".3f"),
                str(r.get("finite", "-")),
                str(r.get("falling", "-")),
                status_text(case),
            )
        console.print(c)
    if kind == "section_startup":
        imp = Table(
            title="4. Heavy modules imported (cumulative import seconds, and the outermost import that pulled each in; '-' = not imported)",
            title_justify="left",
        )
        imp.add_column("module")
        for what in sec["imports"]:
            imp.add_column(what, justify="right")
        for mod in HEAVY_MODULES:
            cells = []
            for w in sec["imports"]:
                hit = sec["imports"][w].get(mod)
                cells.append(
                    "-"
                    if not isinstance(hit, dict)
                    else f"{hit['seconds']:.2f}" + (f" (via {hit['via']})" if hit["via"] else "")
                )
            imp.add_row(mod, *cells)
        console.print(imp)
    for note in sec.get("notes", []):
        console.print(f"  [dim]{note}[/dim]", highlight=False)
    if sec["goals"]:
        g = Table(title_justify="left", show_header=True)
        for col in ("goal", "value", "target", "met"):
            g.add_column(col)
        for x in sec["goals"]:
            v = x["value"]
            value = (
                "-"
                if v is None
                else (f"{v:.1%}" if "%" in x["target"] and "within" not in x["target"] else f"{v:.3f}")
            )
            met = {True: "yes", False: "NO", None: "not judged"}[x["met"]]
            g.add_row(x["goal"], value, x["target"], met)
        console.print(g)


def section_json(sec: dict) -> dict:
    out = {k: v for k, v in sec.items() if k not in ("cases", "checks")}
    out["cases"] = {c.key: c.as_json() for c in sec["cases"]}
    if "checks" in sec:
        out["checks"] = {c.key: c.as_json() for c in sec["checks"]}
    return out


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def prepare(ctx_work: Path, plan: Plan, threads: int) -> dict:
    """Data, tokenized rows in dtrain's order (as many positions as the longest unpacked case reads; the
    order runs on into further epochs when that is more than the data) and the models, in a subprocess."""
    batch, warmup, measure = plan.throughput[:3]
    positions = max((warmup + measure) * batch, (plan.overhead[1] + plan.overhead[2]) * plan.overhead[0])
    spec = {
        "work": str(ctx_work),
        "max_length": plan.max_length,
        "seed": 0,
        "train_seed": 42,
        "train_examples": plan.train_examples,
        "positions": positions,
        "max_positions": 2 * plan.max_length,
        "models": plan.models,
    }
    if plan.gpu:  # examples per step = tokens_per_step / mean length, known once the data is tokenized
        spec["token_steps"] = [plan.gpu["tokens_per_step"], plan.gpu["warmup"] + plan.gpu["measure"]]
    (ctx_work / "prepare.json").write_text(json.dumps(spec, indent=1))
    proc = run_process(
        [
            sys.executable,
            str(CASES),
            "prepare",
            str(ctx_work / "prepare.json"),
            str(ctx_work / "prepared.json"),
        ],
        ctx_work / "prepare.log",
        subprocess_env(threads),
        1200,
    )
    if proc.rc != 0:
        raise SystemExit(f"bench: preparing data and models failed: {proc.tail()} (log {proc.log})")
    return json.loads((ctx_work / "prepared.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="every case once, 2-3 steps (CI)")
    mode.add_argument("--gpu", action="store_true", help="GPU mode (~1B model, bf16, MFU)")
    parser.add_argument("--out", help="JSON results path (default bench/results/<mode>.json)")
    parser.add_argument("--only", help="comma-separated sections: overhead,throughput,memory,startup,data")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (runs, logs, models)")
    parser.add_argument(
        "--overhead-threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of the overhead section (default 1: a tiny model gains nothing from more, and "
        "spinning OpenMP threads on a busy machine swamp the per-step overhead being measured)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of single-process cases (default: all cores)",
    )
    args = parser.parse_args(argv)

    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # CI logs and files: wide enough that no table wraps
        console = Console(width=200)
    plan = PLANS["quick" if args.quick else "gpu" if args.gpu else "full"]
    sections = plan.sections
    if args.only:
        sections = tuple(s for s in args.only.split(",") if s in SECTIONS)
    threads = args.threads or plan.threads or (None if plan.mode == "gpu" else os.cpu_count())
    out_path = Path(args.out) if args.out else BENCH / "results" / f"{plan.mode}.json"
    work = Path(tempfile.mkdtemp(prefix=f"dtrain-bench-{plan.mode}-"))
    started = time.perf_counter()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    def say(msg: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:7.1f}s[/dim] {msg}", highlight=False)

    load_start = os.getloadavg()[0]
    if load_start > 0.5 and plan.mode != "gpu":
        say(
            f"[yellow]warning: load average {load_start:.2f} before starting: other processes are using the CPU; "
            "timings will be noisy (each case is still compared with the others of its repeat)[/yellow]"
        )
    say(f"bench {plan.mode}: work dir {work}")
    say("preparing data and models")
    prep = prepare(work, plan, threads)
    if plan.mode == "gpu" and prep["device"] == "cpu":
        raise SystemExit("bench: --gpu needs a CUDA GPU; none is visible")
    lengths = prep["lengths"]
    say(
        f"data: {lengths['examples']} examples, tokens mean {lengths['mean']:.1f}, p50 {lengths['p50']}, "
        f"p90 {lengths['p90']}, p99 {lengths['p99']}, max {lengths['max']} ({prep['truncated']} truncated)"
    )
    ctx = Ctx(plan, work, prep, threads, args.overhead_threads or 1, args.keep)
    results = []
    for name in sections:
        for fn in SECTIONS[name]:
            say(f"section {fn.__name__.removeprefix('section_')}")
            sec = fn(ctx, say)
            sec["kind"] = fn.__name__
            results.append(sec)
            print_section(console, sec)

    failed = [
        f"{sec['kind']}:{c.key}"
        for sec in results
        for c in [*sec["cases"], *sec.get("checks", [])]
        if c.status == "failed"
    ]
    duration = time.perf_counter() - started

    record = {
        "mode": plan.mode,
        "started": started_at,
        "duration_s": duration,
        "machine": {
            "host": platform.node(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg()[0],
            "device": prep["device"],
            "threads": threads,
            "python": platform.python_version(),
            **{pkg: _version(pkg) for pkg in ("torch", "transformers", "accelerate", "deepspeed")},
        },
        "data": {"lengths": lengths, "truncated": prep["truncated"], "max_length": plan.max_length},
        "models": prep["models"],
        "plan": dataclasses.asdict(plan),
        "sections": [section_json(s) for s in results],
        "failed": failed,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=1, default=str))
    say(f"wrote {out_path} ({duration / 60:.1f} min)")
    if failed:
        say(f"[red]failed cases: {', '.join(failed)}[/red]; work dir kept: {work}")
    elif args.keep:
        say(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

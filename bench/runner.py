"""Running the benchmark's cases (bench/run.py): each in its own process, timed, its peak RSS taken,
its output read back; the context every section reads; repeats run alternately; goals."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plans import Plan

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

TRAIN = REPO / "dtrain" / "train.py"
CASES = BENCH / "cases.py"
MEMPROBE = BENCH / "memprobe.py"
OPTIM = {"lr": 1e-3, "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "warmup_steps": 2}


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
    descendant's). `watch(elapsed, pid)` is called every 10 ms while it runs (pid: `cmd`'s process)."""
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
                watch(elapsed, child.pid)
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


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------------------------
# The context every case reads, and the data and models it is built on (bench/cases.py prepare)
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
        "gpt2_positions": (warmup + measure) * plan.gpt2_batch,  # the GPT-2 throughput cases' rows
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


# --------------------------------------------------------------------------------------------
# dtrain runs and the case processes (bench/cases.py)
# --------------------------------------------------------------------------------------------


def dtrain_args(
    ctx: Ctx,
    model: str,
    steps: int,
    batch: int,
    log_every: int,
    data: str = "train",
    precision: str | None = None,
    template: str = "chat",
    eval_data: str = "eval",
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
        ctx.paths[eval_data],
        "--data.template",
        template,
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
        "--log.plots",  # the Trainer and loop cases draw nothing: like with like
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


def loop_spec(
    ctx: Ctx,
    model: str,
    batch: int,
    warmup: int,
    measure: int,
    log_every: int,
    pad: str,
    ordered: str = "ordered",
) -> dict:
    return {
        "model": ctx.model(model),
        "ordered": ctx.paths[ordered],
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
# Cases, repeats, goals
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


# medians, spreads and per-rank peaks over a case's repeats (the data sections and their tables)
def med(case, key: str):
    values = [r[key] for r in case.repeats if r.get(key) is not None]
    return statistics.median(values) if values else None


def spread(case, key: str):
    values = [r[key] for r in case.repeats if r.get(key) is not None]
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else None


def rank_peaks(case, how=min, key: str = "rank_peak_rss_mib") -> dict[str, float]:
    """Per rank: the lowest (or median, largest) over repeats of one per-rank figure."""
    ranks = sorted({k for r in case.repeats for k in r[key]})
    return {k: how(r[key][k] for r in case.repeats if k in r[key]) for k in ranks}

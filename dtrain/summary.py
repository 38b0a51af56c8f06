"""summary.md: one page on a run, written at its end (and by `dtrain plot RUN_DIR`).

What was trained, how, how it went, where the artefacts are, and the plots embedded as relative links.
Everything is read from the run directory's files (config.yaml, run_info.json, metrics.jsonl, the newest
checkpoint's marker), never from the live run, so the same page comes out of a finished, stopped or killed
run, and out of `dtrain plot` long after.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
from operator import itemgetter
from pathlib import Path
from typing import Any

from dtrain.plots import PLOTS, PLOTS_DIR, RunFiles, Say, _finite, events, read_run, safely

SUMMARY = "summary.md"


def at_end(out_dir: str | os.PathLike, plots: bool, say: Say) -> None:
    """The end of a run (finished or ended early; main process only): the plots when --log.plots, then
    summary.md. Never raises: a failure here becomes one warning line, the run's outcome stands."""
    if plots:
        safely(out_dir, say, quiet=False)
    try:
        write_summary(Path(out_dir))
    except Exception as exc:  # a report must never cost a run
        reason = " ".join(str(exc).split())[:200]
        say(f"dtrain: warning: {SUMMARY} not written ({type(exc).__name__}: {reason})")


def write_summary(run_dir: Path, plots_dir: Path | None = None) -> Path:
    """Write <run_dir>/summary.md (atomically) and return its path."""
    text = render(read_run(run_dir), plots_dir or run_dir / PLOTS_DIR)
    path = run_dir / SUMMARY
    tmp = path.with_name(f".{SUMMARY}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def render(run: RunFiles, plots_dir: Path) -> str:
    parts = [f"# Run {run.name}\n", *what(run), *how(run), *outcome(run), *artefacts(run, plots_dir)]
    parts += plot_links(run, plots_dir)
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------------------------


def _latest(run: RunFiles) -> dict:
    """run_info.json's record of the latest start (the first one, or the newest resume)."""
    resumes = run.info.get("resumes")
    return resumes[-1] if isinstance(resumes, list) and resumes else run.info


def _n(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else ("?" if v is None else str(v))


def _g(v: Any, spec: str = ".4g") -> str:
    return format(v, spec) if _finite(v) else "?"


def what(run: RunFiles) -> list[str]:
    s, info = run.setting, run.info
    name = s("model.name_or_path")
    if name:
        model = f"`{name}`"
    else:
        model = (
            f"the embedded tiny Llama ({s('model.num_layers')} layers, hidden {s('model.hidden_size')}, "
            f"{s('model.num_heads')} heads)"
        )
    lines = ["## What was trained\n", f"- model: {model}"]
    params = info.get("model_parameters")
    trained = (
        (info.get("peft") or {}).get("trainable_parameters") if isinstance(info.get("peft"), dict) else None
    )
    lines.append(f"- parameters: {_n(params)}" + (f" ({_n(trained)} trained)" if trained else ""))
    if s("peft.method") not in (None, "none"):
        lines.append(f"- adapters: {s('peft.method')}, rank {s('peft.r')}, alpha {s('peft.alpha')}")
    lines += data_lines(run)
    last = run.train_rows()[-1] if run.train_rows() else {}
    if _finite(last.get("tokens")):
        lines.append(f"- tokens trained on: {_n(last['tokens'])} (to step {last['step']})")
    return [*lines, ""]


def data_lines(run: RunFiles) -> list[str]:
    s, stats = run.setting, run.info.get("data") or {}
    sources = s("data.sources")
    if isinstance(sources, list) and sources:
        names = ", ".join(f"`{x.get('name') or x.get('path')}` (weight {x.get('weight')})" for x in sources)
        what = f"{len(sources)} sources: {names}"
    elif s("data.path"):
        what = f"`{s('data.path')}` ({s('data.template')} template)"
    elif s("data.prepared"):
        what = f"prepared directory `{s('data.prepared')}`"
    else:
        tasks = s("data.synthetic_tasks")
        what = "the embedded synthetic tasks" + (f" ({', '.join(tasks)})" if isinstance(tasks, list) else "")
    line = f"- data: {what}"
    if stats:
        line += (
            f"; {_n(stats.get('train_examples'))} train examples, {_n(stats.get('train_tokens'))} tokens "
            f"({_n(stats.get('train_truncated'))} truncated); {_n(stats.get('eval_examples'))} eval examples"
        )
    out = [line]
    shares = (_latest(run).get("ended") or {}).get("data_sources")
    if isinstance(shares, dict):
        out += [
            f"  - `{n}`: {_n(v.get('tokens'))} tokens, share {_g(v.get('token_share'), '.1%')} "
            f"(target {_g(v.get('target_share'), '.1%')})"
            for n, v in shares.items()
        ]
    return out


def how(run: RunFiles) -> list[str]:
    s = run.setting
    dist = _latest(run).get("distributed") or {}
    world = dist.get("num_processes")
    precision = {"no": "fp32", None: "?"}.get(dist.get("mixed_precision"), dist.get("mixed_precision"))
    profile = newest_marker(run).get("profile")
    launch = f"profile `{profile}`, " if profile else ""
    lines = [
        "## How\n",
        f"- launch: {launch}{dist.get('type', '?')}, world size {_n(world)} on {dist.get('device', '?')}",
        f"- precision: {precision}",
    ]
    per, acc = s("train.per_device_batch_size"), s("train.gradient_accumulation_steps")
    if isinstance(per, int) and isinstance(acc, int) and isinstance(world, int):
        lines.append(f"- global batch: {per * acc * world} ({per} per device x {acc} accumulation x {world})")
    length = s("train.max_steps")
    lines.append(f"- length: {_n(length)} steps" if length else f"- length: {s('train.num_epochs')} epochs")
    lines.append(
        f"- optimizer: {s('optim.name')}, lr {s('optim.lr')}, weight decay {s('optim.weight_decay')}, "
        f"gradient clipping {s('train.max_grad_norm') or 'off'}"
    )
    warm = s("optim.warmup_steps")
    warmup = f"{warm} warmup steps" if warm is not None else f"warmup ratio {s('optim.warmup_ratio')}"
    sched = f"- schedule: {s('optim.scheduler')}, {warmup}"
    if s("optim.scheduler") == "wsd":
        sched += f", decay over {s('optim.decay_fraction')} of the steps"
    lines.append(sched + f", min lr ratio {s('optim.min_lr_ratio')}")
    lines.append(f"- packing: {'on' if s('data.packing') else 'off'}, max length {s('data.max_length')}")
    return [*lines, ""]


def newest_marker(run: RunFiles) -> dict:
    """The newest checkpoint's marker (it names the launch profile), or {}."""
    steps = sorted((run.path / "checkpoints").glob("step-*/dtrain_checkpoint.json"))
    try:
        return json.loads(steps[-1].read_text()) if steps else {}
    except (OSError, ValueError):
        return {}


def outcome(run: RunFiles) -> list[str]:
    lines = ["## How it went\n", f"- ended: {ending(run)}"]
    train, evals = run.train_rows(), run.eval_rows()
    if train:
        last = train[-1]
        lines.append(f"- final train loss: {_g(last.get('loss'))} at step {last['step']}")
    metric = run.setting("eval.metric") or "loss"
    for key, best_of in (("eval_loss", min), ("eval_exact_match", max)):
        rows = [r for r in evals if _finite(r.get(key))]
        if rows:
            best = best_of(rows, key=itemgetter(key))
            tracked = " (the tracked eval.metric)" if key == f"eval_{metric}" else ""
            lines.append(
                f"- {key}: final {_g(rows[-1][key])} at step {rows[-1]['step']}, best {_g(best[key])} at "
                f"step {best['step']}{tracked}"
            )
    if not evals:
        lines.append("- eval: no eval rows in metrics.jsonl")
    lines += throughput(run)
    lines += faults(run)
    return [*lines, ""]


def ending(run: RunFiles) -> str:
    """How the latest start ended (run_info.json's end record), or that it left none."""
    end = _latest(run).get("ended")
    steps = run.train_rows()
    if not isinstance(end, dict):
        last = f" (last logged step {steps[-1]['step']})" if steps else ""
        return f"no end record: the run was killed or is still running{last}"
    extra = "".join(f", {k} {end[k]}" for k in ("signal",) if end.get(k))
    return f"**{end.get('reason')}** at step {end.get('step')}{extra} ({end.get('at')})"


def wall_time(run: RunFiles) -> float | None:
    """Seconds from each start to its end record, summed over the resumes (None when no start ended)."""
    total, known = 0.0, False
    for info in [run.info, *(run.info.get("resumes") or [])]:
        try:
            start = _dt.datetime.fromisoformat(info["started"])
            end = _dt.datetime.fromisoformat(info["ended"]["at"])
        except (KeyError, TypeError, ValueError):
            continue
        total, known = total + (end - start).total_seconds(), True
    return total if known else None


def throughput(run: RunFiles) -> list[str]:
    lines = []
    wall = wall_time(run)
    if wall is not None:
        lines.append(f"- wall time: {_dt.timedelta(seconds=round(wall))}")
    for key, label, spec in (
        ("tokens_per_sec", "tokens/s (median, all ranks)", ",.0f"),
        ("mfu", "MFU", ".1%"),
    ):
        ys = run.series(key)[1]
        if ys:
            lines.append(f"- {label}: {_g(statistics.median(ys), spec)}")
    peaks = [
        r["peak_memory_mib_per_rank"]
        for r in run.train_rows()
        if isinstance(r.get("peak_memory_mib_per_rank"), list)
    ]
    if peaks:
        per_rank = [max(p[i] for p in peaks if i < len(p)) for i in range(max(len(p) for p in peaks))]
        lines.append(
            f"- peak memory: {max(per_rank):,.0f} MiB (per rank: {', '.join(f'{m:,.0f}' for m in per_rank)})"
        )
    return lines


def faults(run: RunFiles) -> list[str]:
    marks = events(run)
    last = run.train_rows()[-1] if run.train_rows() else {}
    lines = []
    for key, kind in (
        ("skipped_steps", "skipped"),
        ("empty_steps", "empty"),
        ("nonfinite_steps", "nonfinite"),
    ):
        count = last.get(key) or len(marks.get(kind, []))
        lines.append(f"- {kind} steps: {count}" + (f" (at {_steps(marks[kind])})" if marks.get(kind) else ""))
    lines.append(
        f"- resumes: {len(marks['resume'])}"
        + (f" (from step {_steps(marks['resume'])})" if marks["resume"] else "")
    )
    if marks["rollback"]:
        lines.append(f"- rollbacks: {len(marks['rollback'])} (faults at {_steps(marks['rollback'])})")
    if run.torn:
        lines.append(f"- metrics.jsonl: {run.torn} unreadable line(s) (a run killed mid-write)")
    return lines


def _steps(steps: list[int], most: int = 10) -> str:
    shown = ", ".join(str(s) for s in steps[:most])
    return shown + (f" and {len(steps) - most} more" if len(steps) > most else "")


def artefacts(run: RunFiles, plots_dir: Path) -> list[str]:
    p = run.path
    ckpts = sorted(
        c.name for c in (p / "checkpoints").glob("step-*") if (c / "dtrain_checkpoint.json").is_file()
    )
    lines = ["## Artefacts\n"]
    lines.append(
        f"- checkpoints: {', '.join(f'`checkpoints/{c}`' for c in ckpts)}" if ckpts else "- checkpoints: none"
    )
    if (p / "checkpoints" / "best").exists():
        lines.append("- best checkpoint: `checkpoints/best`")
    lines.append(
        "- final model: `final/`"
        if (p / "final" / "config.json").is_file()
        else "- final model: none (not exported)"
    )
    for name, about in (
        ("metrics.jsonl", f"{len(run.rows)} rows"),
        ("samples.jsonl", "sample generations"),
        ("run_info.json", "versions, hardware, command, how each start ended"),
        ("config.yaml", "the resolved config: `--config` it to rerun"),
    ):
        if (p / name).is_file():
            lines.append(f"- `{name}`: {about}")
    pngs = sorted(plots_dir.glob("*.png")) if plots_dir.is_dir() else []
    if pngs:
        lines.append(f"- plots: `{_rel(plots_dir, p)}/` ({len(pngs)} PNGs)")
    return [*lines, ""]


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def plot_links(run: RunFiles, plots_dir: Path) -> list[str]:
    """The PNGs that exist, in the order of dtrain.plots.PLOTS, as relative image links."""
    present = [p for p in PLOTS if (plots_dir / p.png).is_file()]
    if not present:
        return []
    lines = ["## Plots\n"]
    for p in present:
        lines.append(f"![{p.png.removesuffix('.png')}]({_rel(plots_dir / p.png, run.path)})\n")
    return lines

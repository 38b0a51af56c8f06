"""Section 4: seconds to the first optimizer step and to --print_config, and the heavy modules imported
(bench/run.py's docstring)."""

from __future__ import annotations

import re
import sys

from runner import TRAIN, Case, CaseError, Ctx, run_alternately, run_process, subprocess_env


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

        def watch(elapsed, _pid):
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

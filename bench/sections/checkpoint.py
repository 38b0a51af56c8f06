"""Section 6: what a checkpoint costs the training loop, synchronous against --checkpoint.async_save
(bench/run.py's docstring)."""

from __future__ import annotations

import statistics

from runner import (
    Case,
    CaseError,
    Ctx,
    dtrain_args,
    free_port,
    goal,
    run_alternately,
    run_process,
    subprocess_env,
    train_rows,
)


def _step_seconds(rows: list[dict]) -> dict[int, float]:
    """step -> seconds of that step, from the log rows (one per step here; the clock restarts after a save,
    so a step's time excludes the save that preceded it)."""
    out, prev = {}, None
    for r in rows:
        if prev is not None and r.get("tokens_per_sec"):
            out[r["step"]] = (r["tokens"] - prev) / r["tokens_per_sec"]
        prev = r["tokens"]
    return out


def section_checkpoint(ctx: Ctx, say) -> dict:
    from dtrain.config import parse_config
    from dtrain.launch import build_command, load_profile, preflight

    steps, every, world = ctx.plan.checkpoint  # optimizer steps, save every, ranks
    model = "ckpt"
    params = ctx.prep["models"][model]["params"]

    def run(r, mode: str):
        out = ctx.fresh(f"ckpt-{mode}")
        args = [
            *dtrain_args(ctx, model, steps, 1, 1),
            *("--checkpoint.save_steps", str(every), "--checkpoint.keep_last", "2"),
            *("--checkpoint.async_save", "true" if mode == "async" else "false"),
            "--output_dir",
            str(out),
        ]
        prof = load_profile("ddp")
        problems = preflight(prof, parse_config(args), world, True, 0, False)
        if problems:
            raise CaseError("; ".join(problems))
        cmd, env = build_command(prof, world, 1, 0, f"127.0.0.1:{free_port()}", True, args)
        proc = run_process(
            cmd,
            out / "log.txt",
            subprocess_env(1, **env, HF_DATASETS_CACHE=str(ctx.work / "hf_datasets")),
            ctx.plan.timeout,
        )
        if proc.rc != 0:
            raise CaseError(f"{mode} exited {proc.rc}: {proc.tail()} (log {proc.log})")
        rows = train_rows(out)
        saves = [
            r for r in rows if "save_step" in r and r["save_step"] < steps
        ]  # the final save waits: not counted
        if not saves:
            raise CaseError(f"{mode}: no periodic save was logged")
        seconds = _step_seconds(rows)
        # the steps right after a save: under async_save they run while the writer writes
        overlapping = {s for save in saves for s in range(save["save_step"] + 1, save["save_step"] + every)}
        after = [t for s, t in seconds.items() if s in overlapping]
        others = [t for s, t in seconds.items() if s > 1 and s not in overlapping]
        return {
            "saves": len(saves),
            "blocked_s": statistics.median(s["save_blocked_s"] for s in saves),
            "committed_s": statistics.median(s["save_committed_s"] for s in saves),
            "step_after_save_s": statistics.median(after) if after else None,
            "step_s": statistics.median(seconds[s] for s in seconds if s > 1),
            "others_s": statistics.median(others) if others else None,
            "wall_s": proc.seconds,
            "peak_rss_mib": proc.peak_rss_mib,
        }

    cases = [
        Case("sync", f"--checkpoint.async_save false, ddp x {world}", lambda r: run(r, "sync")),
        Case("async", f"--checkpoint.async_save true, ddp x {world}", lambda r: run(r, "async")),
    ]
    run_alternately(cases, 1, say)
    sync, background = (c.repeats[-1] if c.repeats else None for c in cases)
    goals = []
    if sync and background:
        share = background["blocked_s"] / sync["blocked_s"] if sync["blocked_s"] else None
        goals.append(
            goal(
                "async blocked / sync blocked, per save",
                share,
                "<= 0.2",
                share is not None and share <= 0.2,
                ctx.plan.mode != "quick",
            )
        )
    notes = [
        f"{params / 1e6:.0f}M parameters, fp32 AdamW: {params * 16 / 2**30:.2f} GiB of model and optimizer state per rank",
        "blocked: the training thread's time in the save step (sync: the whole save; async: staging the "
        "snapshot to host memory); committed: from the save step until the marker is written",
        "step after save: steps that start while the background writer runs; on 2 cores the writer competes "
        "with the ranks' compute",
    ]
    return {
        "title": f"6. Checkpoint cost, {world} CPU ranks, a save every {every} of {steps} steps",
        "cases": cases,
        "goals": goals,
        "notes": notes,
    }

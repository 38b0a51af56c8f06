"""Section 6: what a checkpoint costs the training loop, synchronous against --checkpoint.async_save
(bench/run.py's docstring), and how long a stop request takes when a background save is in flight (the
part of PET_SHUTDOWN_TIMEOUT it uses)."""

from __future__ import annotations

import json
import os
import signal
import statistics
from pathlib import Path

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

from dtrain.checkpoint import TMP_PREFIX


def _step_seconds(rows: list[dict]) -> dict[int, float]:
    """step -> seconds of that step, from the log rows (one per step here; the clock restarts after a save,
    so a step's time excludes the save that preceded it)."""
    out, prev = {}, None
    for r in rows:
        if prev is not None and r.get("tokens_per_sec"):
            out[r["step"]] = (r["tokens"] - prev) / r["tokens_per_sec"]
        prev = r["tokens"]
    return out


class StopDuringSave:
    """run_process's `watch`: SIGTERM to the launcher once a periodic background save (of a step before
    `before`, the run's last) is in flight, its temporary directory holding every rank's files, as a
    scheduler's preemption would; notes when it was sent."""

    def __init__(self, out, world: int, before: int):
        self.root, self.world, self.before = out / "checkpoints", world, before
        self.sent_at: float | None = None
        self.in_flight: str | None = None

    def __call__(self, elapsed: float, pid: int) -> None:
        if self.sent_at is not None or not self.root.is_dir():
            return
        for tmp in self.root.glob(f"{TMP_PREFIX}step-*"):
            step = int(tmp.name.rsplit("-", 1)[1])
            if step < self.before - 1 and len(list((tmp / "rng").glob("rank-*.pt"))) == self.world:
                self.in_flight = tmp.name.removeprefix(TMP_PREFIX)
                os.kill(pid, signal.SIGTERM)
                self.sent_at = elapsed
                return


def section_checkpoint(ctx: Ctx, say) -> dict:
    from dtrain.config import parse_config
    from dtrain.launch import build_command, load_profile, preflight

    steps, every, world = ctx.plan.checkpoint  # optimizer steps, save every, ranks
    model = "ckpt"
    params = ctx.prep["models"][model]["params"]

    def run(r, mode: str):
        out = ctx.fresh(f"ckpt-{mode}")
        args = [
            # a stop ends the run at its first save seen in flight: room for many, the last one not among them
            *dtrain_args(ctx, model, steps * 4 if mode == "stop" else steps, 1, 1),
            *(
                "--checkpoint.save_steps",
                str(every),
                "--checkpoint.keep_last",
                str(steps if mode == "stop" else 2),
            ),
            *("--checkpoint.async_save", "false" if mode == "sync" else "true"),
            "--output_dir",
            str(out),
        ]
        prof = load_profile("ddp")
        problems = preflight(prof, parse_config(args), world, True, 0, False)
        if problems:
            raise CaseError("; ".join(problems))
        cmd, env = build_command(prof, world, 1, 0, f"127.0.0.1:{free_port()}", True, args)
        # the launcher `dtrain launch` runs (a stop's exit code is the ranks' 75)
        cmd = ["dtrain.launch_accelerate" if part == "accelerate.commands.launch" else part for part in cmd]
        watch = StopDuringSave(out, world, before=steps * 4) if mode == "stop" else None
        proc = run_process(
            cmd,
            out / "log.txt",
            subprocess_env(1, **env, HF_DATASETS_CACHE=str(ctx.work / "hf_datasets")),
            ctx.plan.timeout,
            watch,
        )
        if watch is not None:
            return _stopped(out, proc, watch)
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
        Case("stop", "async, SIGTERM while a save is in flight", lambda r: run(r, "stop")),
    ]
    run_alternately(cases, 1, say)
    sync, background = (c.repeats[-1] if c.repeats else None for c in cases[:2])
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
        "stop: from SIGTERM to the launcher (once a background save's files are all written) to its exit 75: "
        "the rest of that save, then the stop's own; torchrun allows PET_SHUTDOWN_TIMEOUT (120 s) for it",
    ]
    return {
        "title": f"6. Checkpoint cost, {world} CPU ranks, a save every {every} of {steps} steps",
        "cases": cases,
        "goals": goals,
        "notes": notes,
    }


def _stopped(out, proc, watch: StopDuringSave) -> dict:
    """The stop case: exit 75, the save in flight and the stop's own both committed, and how long it took."""
    from dtrain.checkpoint import complete_checkpoints
    from dtrain.signals import STOP_EXIT_CODE

    if watch.sent_at is None:
        raise CaseError(f"stop: no background save was seen in flight (log {proc.log})")
    if proc.rc != STOP_EXIT_CODE:
        raise CaseError(f"stop: exited {proc.rc}, not {STOP_EXIT_CODE}: {proc.tail()} (log {proc.log})")
    ended = json.loads((out / "run_info.json").read_text())["ended"]
    committed = [p.name for p in complete_checkpoints(out / "checkpoints")]
    if watch.in_flight not in committed or Path(ended.get("checkpoint", "")).name not in committed:
        raise CaseError(f"stop: committed {committed}; the save in flight was {watch.in_flight}")
    return {
        "saves": len(committed),
        "stop_s": proc.seconds - watch.sent_at,
        "peak_rss_mib": proc.peak_rss_mib,
    }

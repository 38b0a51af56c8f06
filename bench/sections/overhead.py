"""Section 1: dtrain's per-step overhead against a minimal Accelerate loop on a tiny model (bench/run.py's
docstring)."""

from __future__ import annotations

from runner import (
    Case,
    Ctx,
    dtrain_args,
    goal,
    loop_spec,
    ratio,
    run_alternately,
    run_case_process,
    run_dtrain,
)


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

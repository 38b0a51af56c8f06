"""Section 2: real (non-padding) tokens/s of dtrain, Trainer and a pad-to-max loop (bench/run.py's
docstring)."""

from __future__ import annotations

from runner import (
    Case,
    Ctx,
    dtrain_args,
    goal,
    loop_spec,
    packed_rows,
    ratio,
    run_alternately,
    run_case_process,
    run_dtrain,
)


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

"""Section 2: real (non-padding) tokens/s of dtrain, Trainer and a pad-to-max loop on the Llama, and of
dtrain's padded path against Trainer + DataCollatorForLanguageModeling on a GPT-2 directory with real
text (a second architecture: tied head, learned positions, dropout; bench/run.py's docstring)."""

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
        *gpt2_cases(ctx, warmup, measure, log_every),
    ]
    run_alternately(cases, repeats, say)
    judged = ctx.plan.mode != "quick"
    by = {c.key: c for c in cases}
    goals = []
    pairs = [
        ("dtrain packing", "dtrain_packing", "trainer_dynamic", 1.5),
        ("dtrain packing", "dtrain_packing", "loop_pad_max", 2.0),
        ("dtrain packing", "dtrain_packing", "trainer_flatten", 1.0),
        ("dtrain padded", "dtrain_dynamic", "trainer_dynamic", 1.0),  # the padded path: >= Trainer's speed
        ("GPT-2: dtrain padded", "gpt2_dtrain", "gpt2_trainer", 1.0),
    ]
    for name, key, other_key, target in pairs:
        value = ratio(by[key], by[other_key], "tokens_per_sec")
        goals.append(
            goal(
                f"{name} / {by[other_key].label}",
                value,
                f">= {target}",
                value is not None and value >= target,
                judged,
            )
        )
    m, g = ctx.prep["models"]["bench"], ctx.prep["models"]["gpt2"]
    return {
        "title": f"2. Throughput, real (non-padding) tokens/s (Llama hidden {m['hidden']}, {m['layers']} layers, "
        f"{m['params'] / 1e6:.1f}M params; {batch} examples/step; GPT-2 hidden {g['hidden']}, {g['layers']} "
        f"layers, {g['params'] / 1e6:.1f}M params, {ctx.plan.gpt2_batch} examples/step; max_length "
        f"{ctx.plan.max_length}; {measure} measured steps after {warmup}, {repeats} repeats)",
        "cases": cases,
        "goals": goals,
        "bases": {"gpt2_dtrain": "gpt2_trainer", "gpt2_trainer": "gpt2_trainer"},  # the "vs Trainer" column
    }


def gpt2_cases(ctx: Ctx, warmup: int, measure: int, log_every: int) -> list[Case]:
    """dtrain's padded path (`--data.template text`, no pad token in the tokenizer) against Trainer +
    DataCollatorForLanguageModeling, on the GPT-2 directory and the same ordered rows."""
    batch, steps = ctx.plan.gpt2_batch, warmup + measure

    def go_dtrain(r):
        args = dtrain_args(
            ctx, "gpt2", steps, batch, log_every, data="gpt2_train", template="text", eval_data="gpt2_eval"
        )
        return run_dtrain(ctx, "tp-gpt2-dtrain", args, warmup)

    spec = loop_spec(ctx, "gpt2", batch, warmup, measure, log_every, "longest", ordered="gpt2_ordered")
    trainer = {**spec, "collator": "lm"}
    return [
        Case("gpt2_dtrain", f"GPT-2: dtrain, text, padded ({batch} rows/step)", go_dtrain),
        Case(
            "gpt2_trainer",
            "GPT-2: Trainer + DataCollatorForLanguageModeling",
            lambda r: run_case_process(ctx, "trainer", "tp-gpt2-trainer", trainer),
        ),
    ]

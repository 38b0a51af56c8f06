"""GPU mode: a ~1B Llama, tokens/s and MFU of dtrain and Trainer, and short 8-bit-optimizer runs
(bench/run.py's docstring)."""

from __future__ import annotations

import math

from runner import (
    Case,
    CaseError,
    Ctx,
    dtrain_args,
    goal,
    have,
    loop_spec,
    packed_rows,
    ratio,
    run_alternately,
    run_case_process,
    run_dtrain,
)

# dense bf16 peak FLOP/s by device name, first match wins
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


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

"""Section 3: optimizer-state bytes, per-rank ZeRO/FSDP memory against the formula, and the chunked loss's
peak (bench/run.py's docstring)."""

from __future__ import annotations

import json

from runner import (
    MEMPROBE,
    Case,
    CaseError,
    Ctx,
    dtrain_args,
    free_port,
    goal,
    have,
    run_alternately,
    run_dtrain,
    run_process,
    subprocess_env,
)

LOSS_CHUNK_SIZE = 256  # tokens per chunk of the memory-lean loss (section 3 iii)


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
    """Bytes per parameter per rank for fp32 Adam (params 4, grads 4, optimizer 8), N ranks sharding the
    states (hsdp: its dp_shard, not the world size)."""
    return {"ddp": 16.0, "zero1": 4 + 4 + 8 / n, "zero2": 4 + 12 / n}.get(profile, 16.0 / n)


def section_profiles(ctx: Ctx, say) -> dict:
    from dtrain.launch import TRAIN_SCRIPT, build_command, load_profile, preflight

    cases = []
    for profile in ctx.plan.profiles:

        def go(r, profile=profile):
            # hsdp: 4 ranks as a 2 x 2 mesh, the states divided by the 2 of dp_shard
            world, replicas = (4, 2) if profile == "hsdp" else (2, None)
            shard = world // (replicas or 1)
            out = ctx.fresh(f"mem-{profile}")
            args = [*dtrain_args(ctx, "bench", 2, 2, 1), "--output_dir", str(out)]
            prof = load_profile(profile)
            from dtrain.config import parse_config

            problems = preflight(prof, parse_config(args), world, True, 0, False)
            if problems:
                raise CaseError("; ".join(problems))
            cmd, env = build_command(prof, world, 1, 0, f"127.0.0.1:{free_port()}", True, args, replicas)
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
            formula = zero_formula(profile, shard) * n
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
        "(gradients: the larger of end of backward and just before the update); formula: ZeRO paper, fp32 Adam (4 + 4 + 8 bytes/param), sharded states / N (hsdp: N = dp_shard = 2)",
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
        "title": "3(ii). Per-rank parameters + gradients + optimizer state, 2 CPU ranks (hsdp: 4 as a 2 x 2 "
        "mesh, dp_replicate x dp_shard), fp32 AdamW "
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

"""One benchmark run comparing dtrain with transformers Trainer and minimal hand-written loops.

    make bench                              # full CPU mode: 3-5 repeats (~11 min on 2 cores, + ~10 min of data)
    make bench ARGS=--quick                 # every case once, 2-3 steps (~4 min; CI: proves it runs, judges nothing)
    .venv/bin/python bench/run.py --gpu     # GPU mode: a ~1B Llama, bf16, packing, MFU (~8 min)
    .venv/bin/python bench/run.py --quick --only overhead,memory --keep   # a subset; keep the work dir

Results: a table per section on stdout and JSON in bench/results/<quick|full|gpu>.json (--out PATH).

How it measures
- Every case is its own process (peak RSS from wait4 belongs to that case alone; no import leaks
  between cases), and the cases of a section run alternately: repeat 1 = case A, B, C...; repeat 2 =
  A, B, C... so slow drift of the machine hits every case alike. Medians over repeats are shown, with
  the spread (max - min) / median as "±". A busy machine (load average printed at the start) makes
  timings noisy: OpenMP threads spinning against other processes can slow a step 5x. The overhead
  section therefore runs with OMP_NUM_THREADS=1 (--overhead-threads), the others with all cores
  (--threads; quick mode uses 1 everywhere).
- Data: seeded synthetic SFT rows in chat format (a `messages` column), written to a jsonl file, with
  long-tailed lengths (most examples short, 4% at max_length). Models: random-init Llamas saved with
  `save_pretrained` next to dtrain's char tokenizer in a temporary directory; every case loads the same
  directory (dtrain with `--model.name_or_path DIR --model.tokenizer DIR`, the path users take).
- dtrain runs are the real CLI (`python dtrain/train.py ...`; `dtrain launch PROFILE --cpu` for the
  profiles), eval/generation/periodic checkpoints off (`--eval.steps 0 --eval.num_generate 0
  --checkpoint.save_steps 0`; the end-of-run eval of a 4-row eval file, the final checkpoint and export
  still run but are outside the timed steps). Throughput is read back from `<output_dir>/metrics.jsonl`:
  with `--log.every_steps W` and W warm-up steps, the rows after the first cover exactly steps W+1..N;
  their seconds are (tokens - previous tokens) / tokens_per_sec and their real (non-padding) tokens are
  the `tokens` differences. The Trainer and the loops (bench/cases.py) time the same span: from the end
  of step W to the end of step N, data loading included, counting real tokens on the host.
- Same batches: the Trainer and the loops read dtrain's tokenization (`dtrain.data.templates.encode_batch`)
  in dtrain's data order (`dtrain.data.DataOrder`) with a sequential sampler, so every unpacked case
  trains the very batches dtrain trains. AdamW everywhere with the same lr, betas, eps, weight decay
  (on matrices only), clipping 1.0 and cosine schedule with the same warm-up; foreach AdamW on CPU,
  fused on CUDA (what dtrain picks). Global batch: the unpacked cases take B examples per step; dtrain
  with packing takes round(B x mean length / max_length) packed rows, the same tokens per step as near
  as rows allow (real tokens/step is in the table to check). The Trainer keeps its defaults otherwise,
  except logging_nan_inf_filter (off: its per-step isnan check is a host sync) and no checkpointing.

Sections
1. overhead: dtrain's loop (the CLI, metrics.jsonl) against a minimal Accelerate loop (accumulate,
   backward, clip, optimizer.step, zero_grad; no attention mask and no KV cache, as dtrain's forward) on
   a tiny model, where per-step overhead shows. The CLI rather than in-process `train_step` calls:
   it measures everything dtrain does per step (data loader, bookkeeping, stop-request agreement,
   logging), which is what a user pays. Goal: dtrain step time <= 1.03x the minimal loop.
2. throughput: non-padding tokens/s on a model where attention/MLP dominate (hidden 256, 4 layers):
   dtrain --data.packing true, dtrain with dynamic padding, Trainer + DataCollatorForSeq2Seq (dynamic
   padding, group_by_length off), Trainer + DataCollatorWithFlattening (padding-free: position_ids, no
   mask), and a pad-to-max_length tutorial loop (model(**batch), mask included). Then a second
   architecture, a user's GPT-2 directory (hidden 256, 4 layers, tied head, dropout 0.1, a byte-level
   BPE of 8,192 tokens trained on Python files of site-packages, no pad token): dtrain's padded path
   (`--data.template text`, batch 8) against Trainer + DataCollatorForLanguageModeling on the same
   ordered rows. Goals: dtrain packing >= 1.5x Trainer dynamic, >= 2x pad-to-max, >= 1x Trainer
   flattening; dtrain's padded path >= 1x Trainer on both models (quick mode: a 2-layer, 64-wide GPT-2
   on 40 files, judged on nothing).
3. memory: (i) optimizer-state bytes/param for adamw, adamw_8bit, adamw_8bit_ao (the first metrics row's
   optim_state_bytes_per_param; torchao's step runs eagerly here, TORCHDYNAMO_DISABLE=1, which does not
   change its state bytes and saves its ~30 s compile); (ii) per-rank bytes of parameters + gradients +
   optimizer state under ddp, fsdp, zero1, zero2, zero3 on 2 CPU ranks against the ZeRO paper's fp32 Adam
   formula (4+4+8 bytes/param; see bench/memprobe.py for exactly what is counted); (iii) peak memory
   with and without --train.loss_chunk_size on a 128k-vocabulary model (all rows near max_length).
4. startup: seconds from launch to the first optimizer step of the default run (`python dtrain/train.py
   --train.max_steps 1 --eval.num_generate 0 --eval.num_samples 0 --log.progress_bar false`: the
   embedded data and model as shipped; only the end-of-run generation is off, after the first step
   anyway), taken when metrics.jsonl gets its first row; the whole `--print_config` process; and the
   heavy modules a `--print_config` process (and, in full mode, that training run) imports, from
   `python -X importtime`.
5. data: `dtrain prepare` against the run_clm tokenize + group_texts recipe, start-up and per-rank peak
   RSS of 2-rank runs on prepared 1x and 10x corpora, and (full mode) a 100M-token corpus; see
   bench/data_bench.py.
Quick mode: 1 repeat, 2-3 steps per case, memory profiles ddp and zero3 only, no import timing of the
training run.

GPU mode (--gpu): a ~1B Llama (hidden 2048, 16 layers, 16 heads, intermediate 5632, vocab 32000,
random init, saved in bf16), bf16 mixed precision, max_length 2048: dtrain with packing,
flash_attention_2 when flash_attn imports (else sdpa), fused AdamW, --train.compile true, against
Trainer with DataCollatorWithFlattening; tokens/s and MFU (torchtitan's FLOPs/token: 6 x (params -
embedding params) + 12 x layers x heads x head_dim x seq_len, over 989 TFLOP/s for H100 SXM/H200, 756
H100 PCIe, 312 A100). Both load the fp32 master weights and train under bf16 autocast with fused AdamW
and the same attention kernel; the Trainer is not compiled (its flattened batches change length every
step). Goals: MFU >= 45%, >= 1.3x Trainer tokens/s. Then short bf16 and fp16 dtrain runs with
--optim.name adamw_8bit, checked for finite, falling loss. Each dtrain run's final checkpoint and export
(GBs) are deleted once its metrics are read, unless --keep.

Code: this file parses the flags, runs the sections in order, prints their tables and writes the JSON.
bench/plans.py holds the modes; bench/sections/ one module per section (overhead, throughput, memory,
startup, gpu, data); bench/runner.py the case processes (launch, timing, peak RSS, output read back),
the context, the cases, repeats and goals every section shares; bench/tables.py the tables. The scripts
the case processes run: bench/cases.py (data and models, Trainer, loops), bench/memprobe.py and
bench/data_bench.py.

Quick mode never judges speed; it fails (exit 1) only when a case fails to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from plans import PLANS
from runner import BENCH, REPO, Ctx, prepare
from sections.checkpoint import section_checkpoint
from sections.data import section_data_large, section_data_prepare, section_data_startup
from sections.gpu import section_gpu
from sections.memory import section_loss_memory, section_optim_state, section_profiles
from sections.overhead import section_overhead
from sections.startup import section_startup
from sections.throughput import section_throughput
from tables import make_console, print_section

if str(REPO) not in sys.path:  # `python bench/run.py`: import the dtrain package of this checkout
    sys.path.insert(0, str(REPO))

SECTIONS = {  # --only names -> the section functions, in order; a section's JSON kind is its function's name
    "overhead": [section_overhead],
    "throughput": [section_throughput],
    "memory": [section_optim_state, section_profiles, section_loss_memory],
    "startup": [section_startup],
    "gpu": [section_gpu],
    "data": [section_data_prepare, section_data_startup, section_data_large],
    "checkpoint": [section_checkpoint],
}


def section_json(sec: dict) -> dict:
    out = {k: v for k, v in sec.items() if k not in ("cases", "checks")}
    out["cases"] = {c.key: c.as_json() for c in sec["cases"]}
    if "checks" in sec:
        out["checks"] = {c.key: c.as_json() for c in sec["checks"]}
    return out


def _version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="every case once, 2-3 steps (CI)")
    mode.add_argument("--gpu", action="store_true", help="GPU mode (~1B model, bf16, MFU)")
    parser.add_argument("--out", help="JSON results path (default bench/results/<mode>.json)")
    parser.add_argument("--only", help="comma-separated sections: overhead,throughput,memory,startup,data")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (runs, logs, models)")
    parser.add_argument(
        "--overhead-threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of the overhead section (default 1: a tiny model gains nothing from more, and "
        "spinning OpenMP threads on a busy machine swamp the per-step overhead being measured)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of single-process cases (default: all cores)",
    )
    args = parser.parse_args(argv)

    console = make_console()
    plan = PLANS["quick" if args.quick else "gpu" if args.gpu else "full"]
    sections = plan.sections
    if args.only:
        sections = tuple(s for s in args.only.split(",") if s in SECTIONS)
    threads = args.threads or plan.threads or (None if plan.mode == "gpu" else os.cpu_count())
    out_path = Path(args.out) if args.out else BENCH / "results" / f"{plan.mode}.json"
    work = Path(tempfile.mkdtemp(prefix=f"dtrain-bench-{plan.mode}-"))
    started = time.perf_counter()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    def say(msg: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:7.1f}s[/dim] {msg}", highlight=False)

    load_start = os.getloadavg()[0]
    if load_start > 0.5 and plan.mode != "gpu":
        say(
            f"[yellow]warning: load average {load_start:.2f} before starting: other processes are using the CPU; "
            "timings will be noisy (each case is still compared with the others of its repeat)[/yellow]"
        )
    say(f"bench {plan.mode}: work dir {work}")
    say("preparing data and models")
    prep = prepare(work, plan, threads)
    if plan.mode == "gpu" and prep["device"] == "cpu":
        raise SystemExit("bench: --gpu needs a CUDA GPU; none is visible")
    lengths = prep["lengths"]
    say(
        f"data: {lengths['examples']} examples, tokens mean {lengths['mean']:.1f}, p50 {lengths['p50']}, "
        f"p90 {lengths['p90']}, p99 {lengths['p99']}, max {lengths['max']} ({prep['truncated']} truncated)"
    )
    ctx = Ctx(plan, work, prep, threads, args.overhead_threads or 1, args.keep)
    results = []
    for name in sections:
        for fn in SECTIONS[name]:
            say(f"section {fn.__name__.removeprefix('section_')}")
            sec = fn(ctx, say)
            sec["kind"] = fn.__name__
            results.append(sec)
            print_section(console, sec)

    failed = [
        f"{sec['kind']}:{c.key}"
        for sec in results
        for c in [*sec["cases"], *sec.get("checks", [])]
        if c.status == "failed"
    ]
    duration = time.perf_counter() - started

    record = {
        "mode": plan.mode,
        "started": started_at,
        "duration_s": duration,
        "machine": {
            "host": platform.node(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg()[0],
            "device": prep["device"],
            "threads": threads,
            "python": platform.python_version(),
            **{pkg: _version(pkg) for pkg in ("torch", "transformers", "accelerate", "deepspeed")},
        },
        "data": {"lengths": lengths, "truncated": prep["truncated"], "max_length": plan.max_length},
        "models": prep["models"],
        "plan": dataclasses.asdict(plan),
        "sections": [section_json(s) for s in results],
        "failed": failed,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=1, default=str))
    say(f"wrote {out_path} ({duration / 60:.1f} min)")
    if failed:
        say(f"[red]failed cases: {', '.join(failed)}[/red]; work dir kept: {work}")
    elif args.keep:
        say(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

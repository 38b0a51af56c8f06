"""Section 5: the data side, `dtrain prepare` against the run_clm recipe, and runs on `--data.prepared`.
What is generated and what each table measures is in bench/data_bench.py's docstring; that file is also
the script these sections run for the corpora, the tokenizer and the baseline (`python bench/data_bench.py
KIND SPEC.json RESULT.json`)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from data_bench import MAX_LENGTH, TOKENIZER_VOCAB, write_recipe
from runner import (
    BENCH,
    TRAIN,
    Case,
    CaseError,
    free_port,
    goal,
    med,
    rank_peaks,
    run_alternately,
    run_process,
    subprocess_env,
    train_rows,
)

DATA_BENCH = BENCH / "data_bench.py"
WORLD = 2  # ranks of the start-up runs
SIZES = {  # documents of the 1x corpus, the scale of the bigger one, repeats; tokens of the large corpus
    "quick": {"docs": 300, "scale": 10, "repeats": 1, "train_repeats": 1, "large_tokens": None},
    "full": {"docs": 10000, "scale": 10, "repeats": 2, "train_repeats": 4, "large_tokens": 100_000_000},
}


# --------------------------------------------------------------------------------------------
# Measuring a launch: the ranks' peak RSS and the first train row
# --------------------------------------------------------------------------------------------


class RankWatch:
    """run_process's `watch`: finds the rank processes of one run by its unique output directory on their
    command line (the launcher, whose command line names it too, is left out), polls their VmHWM, and
    notes when metrics.jsonl gets its first train row."""

    def __init__(self, out: Path, every_s: float = 0.02):
        self.marker = str(out).encode()
        self.metrics = out / "metrics.jsonl"
        self.every = every_s
        self.last = -1.0
        self.ranks: dict[int, int | None] = {}  # pid -> RANK
        self.peak_kib: dict[int, dict[str, int]] = {}  # pid -> the largest VmHWM, RssAnon, RssFile seen
        self.first_row_s: float | None = None

    def _scan(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) in self.ranks:
                continue
            try:
                cmd = Path(entry.path, "cmdline").read_bytes()
                if self.marker not in cmd or b"accelerate" in cmd:
                    continue
                stat = Path(entry.path, "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                env = Path(entry.path, "environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if ppid in self.ranks:
                continue  # a process a rank forked (a loader worker): not a rank
            rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
            self.ranks[int(entry.name)] = rank

    def __call__(self, elapsed: float, _pid: int) -> None:
        if elapsed - self.last < self.every:
            return
        self.last = elapsed
        if len(self.ranks) < WORLD:
            self._scan()
        for pid in self.ranks:
            try:
                peak = self.peak_kib.setdefault(pid, {})
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    key = line.split(":", 1)[0]
                    if key in ("VmHWM", "RssAnon", "RssFile"):
                        peak[key] = max(peak.get(key, 0), int(line.split()[1]))
            except (OSError, ValueError, IndexError):
                pass
        if self.first_row_s is None and self.metrics.is_file():
            try:
                if '"loss"' in self.metrics.read_text():
                    self.first_row_s = elapsed
            except OSError:
                pass

    def per_rank_mib(self, key: str = "VmHWM") -> dict[str, float]:
        out = {}
        for pid, rank in sorted(self.ranks.items(), key=lambda x: (x[1] is None, x[1], x[0])):
            out[str(rank if rank is not None else f"pid{pid}")] = (
                self.peak_kib.get(pid, {}).get(key, 0) / 1024.0
            )
        return out


# --------------------------------------------------------------------------------------------
# The shared corpora, tokenizer and model; dtrain prepare, the run_clm baseline, runs on --data.prepared
# --------------------------------------------------------------------------------------------


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def sizes(ctx) -> dict:
    return SIZES["quick" if ctx.plan.mode == "quick" else "full"]


def _state(ctx, say) -> dict:
    """The corpora, tokenizer and model (made once, by the first data section that needs them)."""
    st = ctx.prep.get("data_bench")
    if st is not None:
        return st
    s = sizes(ctx)
    work = ctx.work / "data_bench"
    work.mkdir(parents=True, exist_ok=True)
    spec = {"work": str(work), "docs": s["docs"], "scale": s["scale"], "seed": 0}
    say(
        f"  generating the corpora ({s['docs']:,} and {s['docs'] * s['scale']:,} documents), the tokenizer and the model"
    )
    result = _helper(ctx, "setup", spec, work / "setup")
    st = {**result, "work": str(work), "prepared": {}, "facts": {}}
    ctx.prep["data_bench"] = st
    return st


def _helper(ctx, kind: str, spec: dict, where: Path, timeout: float | None = None) -> dict:
    where.mkdir(parents=True, exist_ok=True)
    (where / "spec.json").write_text(json.dumps(spec, indent=1))
    proc = run_process(
        [sys.executable, str(DATA_BENCH), kind, str(where / "spec.json"), str(where / "result.json")],
        where / "log.txt",
        subprocess_env(ctx.threads),
        timeout or ctx.plan.timeout,
    )
    if proc.rc != 0 or not (where / "result.json").is_file():
        raise CaseError(f"{kind} exited {proc.rc}: {proc.tail()} (log {proc.log})")
    result = json.loads((where / "result.json").read_text())
    result.update(wall_s=proc.seconds, peak_rss_mib=proc.peak_rss_mib)
    return result


def run_prepare(ctx, recipe: str, num_proc: int, name: str, timeout: float | None = None) -> dict:
    """`dtrain prepare --config RECIPE OUT --num-proc N`, with its own empty datasets cache."""
    run = ctx.fresh(name)
    out = run / "prepared"
    cmd = [
        sys.executable,
        "-m",
        "dtrain.cli",
        "prepare",
        "--config",
        recipe,
        str(out),
        "--num-proc",
        str(num_proc),
    ]
    env = subprocess_env(ctx.threads, HF_DATASETS_CACHE=str(run / "hf_datasets"))
    proc = run_process(cmd, run / "log.txt", env, timeout or ctx.plan.timeout)
    if proc.rc != 0 or not (out / "manifest.json").is_file():
        raise CaseError(f"dtrain prepare exited {proc.rc}: {proc.tail()} (log {proc.log})")
    m = json.loads((out / "manifest.json").read_text())
    train = next(iter(m["sources_data"].values()))["train"]
    written = du(out)
    return {
        "wall_s": proc.seconds,
        "in_process_s": m["seconds"],
        "peak_rss_mib": proc.peak_rss_mib,
        "documents": train["documents"],
        "examples": train["examples"],
        "tokens": train["tokens"],  # written: documents + EOS + piece overlaps
        "text_tokens": train["tokens"] - train["examples"],  # each piece adds one: its EOS or its overlap
        "rows": train.get("rows"),
        "fill": train.get("fill"),
        "disk_bytes": written,
        "disk_bytes_per_token": written / max(1, train["tokens"]),
        "datasets_cache_bytes": du(run / "hf_datasets"),
        "prepared": str(out),
    }


def run_baseline(ctx, st: dict, num_proc: int, name: str) -> dict:
    run = ctx.fresh(name)
    spec = {
        "path": st["corpora"]["1x"]["path"],
        "model": st["model"]["path"],
        "num_proc": num_proc,
        "block_size": MAX_LENGTH,
        "cache": str(run / "hf_datasets"),
    }
    result = _helper(ctx, "baseline", spec, run)
    result["datasets_cache_bytes"] = du(run / "hf_datasets")
    shutil.rmtree(run / "hf_datasets", ignore_errors=True)
    return result


def run_prepared_training(ctx, recipe: str, prepared: str, name: str, timeout: float | None = None) -> dict:
    """A 2-step run as WORLD CPU ranks on a prepared directory, as tests/conftest.py `run_accelerate`
    launches it; start-up and each rank's peak RSS from RankWatch."""
    out = ctx.fresh(name)
    args = [
        "--config",
        recipe,
        "--data.prepared",
        prepared,
        "--train.max_steps",
        "2",
        "--train.per_device_batch_size",
        "4",
        "--log.every_steps",
        "1",
        "--eval.steps",
        "0",
        "--eval.num_generate",
        "0",
        "--eval.num_samples",
        "0",
        "--checkpoint.save_steps",
        "0",
        "--log.progress_bar",
        "false",
        "--output_dir",
        str(out),
    ]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(WORLD),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(TRAIN),
        *args,
    ]
    env = subprocess_env(1, ACCELERATE_USE_CPU="1")
    watch = RankWatch(out)
    proc = run_process(cmd, out / "log.txt", env, timeout or ctx.plan.timeout, watch)
    rows = train_rows(out)
    if proc.rc != 0 or watch.first_row_s is None or len(rows) != 2:
        raise CaseError(f"training on {prepared} exited {proc.rc}: {proc.tail()} (log {proc.log})")
    ranks = watch.per_rank_mib()
    if len(ranks) != WORLD:
        raise CaseError(f"found {len(ranks)} rank processes, not {WORLD}: {ranks} (log {proc.log})")
    info = json.loads((out / "run_info.json").read_text()).get("data", {})
    first = [float(x) for x in rows[0].get("peak_memory_mib_per_rank") or []]  # dtrain's ru_maxrss per rank
    if not ctx.keep:
        for heavy in ("checkpoints", "final"):
            shutil.rmtree(out / heavy, ignore_errors=True)
    return {
        "startup_s": watch.first_row_s,
        "wall_s": proc.seconds,
        "rank_peak_rss_mib": ranks,
        "rank_first_step_rss_mib": {str(i): v for i, v in enumerate(first)},
        "rank_rss_file_mib": watch.per_rank_mib("RssFile"),  # the largest file-backed part (mapped arrays)
        "rank_rss_anon_mib": watch.per_rank_mib("RssAnon"),
        "peak_rss_mib": max(ranks.values()),
        "launcher_peak_rss_mib": proc.peak_rss_mib,  # wait4: the launcher or its largest reaped child
        "documents": info.get("train_documents"),
        "tokens": info.get("train_tokens"),
        "rows": info.get("packed_rows"),
        "output_dir": str(out),
    }


# --------------------------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------------------------


def section_data_prepare(ctx, say) -> dict:
    st = _state(ctx, say)
    s = sizes(ctx)
    big = f"{s['scale']}x"

    def prep(num_proc: int, corpus: str = "1x"):
        def go(r):
            result = run_prepare(ctx, st["recipes"][corpus], num_proc, f"data-prepare-{corpus}-np{num_proc}")
            st["prepared"].setdefault(corpus, result["prepared"])  # the first one serves 5(ii)
            return result

        return go

    def base(num_proc: int):
        return lambda r: run_baseline(ctx, st, num_proc, f"data-runclm-np{num_proc}")

    cases = [
        Case("dtrain_np2", "dtrain prepare --num-proc 2", prep(2)),
        Case("runclm_np2", "run_clm map + group_texts, num_proc 2", base(2)),
        Case("dtrain_np1", "dtrain prepare --num-proc 1", prep(1)),
        Case("runclm_np1", "run_clm map + group_texts, num_proc 1", base(1)),
    ]
    run_alternately(cases, s["repeats"], say)
    by = {c.key: c for c in cases}
    text_tokens = next(
        (r["text_tokens"] for c in cases if c.key.startswith("runclm") for r in c.repeats), None
    )
    for c in cases:  # one numerator for every case: the corpus's text tokens as the tokenizer counts them
        for r in c.repeats:
            r["corpus"], r["corpus_text_tokens"] = "1x", text_tokens or r.get("text_tokens")
            r["tokens_per_sec"] = r["corpus_text_tokens"] / r["wall_s"] if r["corpus_text_tokens"] else None
    scaled = Case(f"dtrain_np2_{big}", f"dtrain prepare --num-proc 2, {big} corpus", prep(2, big))
    run_alternately([scaled], 1, say)
    for r in scaled.repeats:
        r["corpus"], r["corpus_text_tokens"] = big, r["text_tokens"]
        r["tokens_per_sec"] = r["text_tokens"] / r["wall_s"]
    cases.append(scaled)
    notes = []
    for n in (2, 1):
        d, h = med(by[f"dtrain_np{n}"], "wall_s"), med(by[f"runclm_np{n}"], "wall_s")
        if d and h:
            notes.append(
                f"num_proc {n}: dtrain prepare takes {d:.1f} s, the run_clm recipe {h:.1f} s "
                f"({h / d:.2f}x dtrain's tokens/s against the baseline's)"
            )
    d, h = by["dtrain_np2"].repeats, by["runclm_np2"].repeats
    if d and h:
        agree = d[0]["text_tokens"] == h[0]["text_tokens"] and d[0]["examples"] == h[0]["dtrain_pieces"]
        notes.append(
            f"same corpus, same tokens: {h[0]['text_tokens']:,} text tokens in {h[0]['documents']:,} "
            f"documents; dtrain wrote {d[0]['tokens']:,} (+1 EOS per document, +1 per piece boundary: "
            f"{d[0]['examples']:,} pieces, {'as' if agree else 'NOT as'} the baseline's lengths predict), "
            f"{d[0]['rows']:,} packed rows {d[0]['fill']:.1%} full; run_clm kept "
            f"{h[0]['block_tokens']:,} in {h[0]['blocks']:,} blocks (no EOS; each map batch's remainder dropped)"
        )
    st["facts"]["text_tokens_1x"] = text_tokens
    return {
        "title": f"5(i). Tokenization: dtrain prepare vs the run_clm recipe (byte-level BPE, {TOKENIZER_VOCAB:,} "
        f"tokens; template text, max_length {MAX_LENGTH}, packing; {st['corpora']['1x']['documents']:,} "
        f"documents, {s['repeats']} repeat(s); seconds = the whole process)",
        "cases": cases,
        "goals": [],
        "notes": notes,
        "corpora": st["corpora"],
        "tokens_per_word": st["tokens_per_word"],
    }


def section_data_startup(ctx, say) -> dict:
    st = _state(ctx, say)
    s = sizes(ctx)
    big = f"{s['scale']}x"
    for corpus in ("1x", big):
        if corpus not in st["prepared"]:  # --only data runs 5(i) first; this is for a failed case there
            say(f"  dtrain prepare {corpus} (for the start-up runs)")
            st["prepared"][corpus] = run_prepare(ctx, st["recipes"][corpus], 2, f"data-prepare-{corpus}")[
                "prepared"
            ]

    def train(corpus: str):
        return lambda r: run_prepared_training(
            ctx, st["recipes"][corpus], st["prepared"][corpus], f"data-train-{corpus}"
        )

    cases = [
        Case("train_1x", "2 ranks, 2 steps, --data.prepared 1x", train("1x")),
        Case(f"train_{big}", f"2 ranks, 2 steps, --data.prepared {big}", train(big)),
    ]
    run_alternately(cases, s["train_repeats"], say)
    judged = ctx.plan.mode != "quick"
    a, b = cases
    goals = []
    first = "rank_first_step_rss_mib"
    pa, pb = (rank_peaks(x, statistics.median, first) if x.repeats else {} for x in (a, b))
    common = [k for k in pa if k in pb and pa[k]]
    rss = max(pb[k] / pa[k] - 1 for k in common) if common else None  # the rank that grew most
    goals.append(
        goal(
            f"peak RSS per rank to step 1, {big} over 1x (worst rank)",
            rss,
            "<= +10%",
            rss is not None and rss <= 0.10,
            judged,
        )
    )
    sa, sb = med(a, "startup_s"), med(b, "startup_s")
    up = (sb - sa) if sa is not None and sb is not None else None
    goals.append(goal(f"start-up, {big} minus 1x (s)", up, "<= +2 s", up is not None and up <= 2.0, judged))
    st["facts"]["train_1x"] = {"startup_s": sa, "first_step_rss_mib": pa, "peak_rss_mib": rank_peaks(a)}
    return {
        "title": f"5(ii). Start-up and peak RSS per rank on a prepared corpus ({WORLD} CPU ranks, gloo, 2 steps "
        f"of 4 packed rows per rank; {s['train_repeats']} repeat(s))",
        "cases": cases,
        "goals": goals,
        "notes": [
            "start-up: launch -> first train row in metrics.jsonl (median); to step 1: each rank's peak "
            "RSS through start-up and the first step (ru_maxrss, dtrain's peak_memory_mib_per_rank of "
            "the first row; median), what the goal reads; whole run: each rank's VmHWM polled (the "
            "launcher not included), lowest and median over repeats; file-backed: the largest RssFile "
            "seen (libraries and the memory-mapped arrays)",
            "the whole-run peak of a rank jumps by ~50-100 MiB in some runs and not in others, at every "
            "corpus size, in step 2 (likely how the allocator serves the step's logits-sized buffers, "
            "4 x 256 x 8192 fp32 = 32 MiB each), so it is shown but does not decide the goal",
        ],
    }


def section_data_large(ctx, say) -> dict:
    s = sizes(ctx)
    want = s["large_tokens"]
    title = f"5(iii). A corpus of {want or 100e6:,.0f}+ tokens: dtrain prepare --num-proc 2 and a 2-rank run on it"
    if not want:  # no case at all (a skipped case would read as one that did not run)
        return {"title": title, "cases": [], "goals": [], "notes": ["full mode only"]}
    st = _state(ctx, say)
    work = Path(st["work"])
    gen = Case("generate", "generate the corpus (jsonl)")
    prep = Case("prepare", "dtrain prepare --num-proc 2")
    train = Case("train", f"{WORLD} ranks, 2 steps, --data.prepared")

    def generate(r):
        spec = {
            "path": str(work / "corpus-large.jsonl"),
            "tokens": want,
            "seed": 1,
            "tokens_per_word": st["tokens_per_word"],
        }
        return _helper(ctx, "large_corpus", spec, work / "large", timeout=3600)

    def prepare(r):
        corpus = work / "corpus-large.jsonl"
        st["recipes"]["large"] = write_recipe(work, "large", corpus, st["model"]["path"])
        result = run_prepare(ctx, st["recipes"]["large"], 2, "data-prepare-large", timeout=7200)
        result["tokens_per_sec"] = result["text_tokens"] / result["wall_s"]
        st["prepared"]["large"] = result["prepared"]
        shutil.rmtree(Path(result["prepared"]).parent / "hf_datasets", ignore_errors=True)
        return result

    gen.run, prep.run = generate, prepare
    train.run = lambda r: run_prepared_training(
        ctx, st["recipes"]["large"], st["prepared"]["large"], "data-train-large", timeout=1800
    )
    for case in (gen, prep, train):
        run_alternately([case], 1, say)
        if case.status == "failed":
            break
    # GBs; the recipe's source, so kept until the run has checked it against the prepared manifest
    (work / "corpus-large.jsonl").unlink(missing_ok=True)
    for case in (prep, train):
        if case.status == "ok" and not case.repeats:
            case.status, case.note = "skipped", "an earlier step failed"
    notes = []
    base = st["facts"].get("train_1x") or {}
    if train.repeats and base.get("startup_s"):
        r = train.repeats[0]

        def grow(key: str, ref: dict) -> str:
            return ", ".join(f"rank {k} {v / ref[k] - 1:+.1%}" for k, v in r[key].items() if ref.get(k))

        notes.append(
            f"against the 1x corpus ({st['corpora']['1x']['documents']:,} documents): start-up "
            f"{r['startup_s'] - base['startup_s']:+.2f} s (against its median), RSS to step 1 "
            f"{grow('rank_first_step_rss_mib', base['first_step_rss_mib'])} (against its median), "
            f"whole-run peak {grow('rank_peak_rss_mib', base['peak_rss_mib'])} (against its lowest)"
        )
    if prep.repeats:
        r = prep.repeats[0]
        notes.append(
            f"dtrain prepare peak RSS {r['peak_rss_mib']:.0f} MiB; its datasets cache (the json read "
            f"into Arrow and the map's output, left in HF_DATASETS_CACHE) held "
            f"{r['datasets_cache_bytes'] / 2**30:.2f} GiB beside the {r['disk_bytes'] / 2**30:.2f} GiB prepared"
        )
    return {"title": title, "cases": [gen, prep, train], "goals": [], "notes": notes}

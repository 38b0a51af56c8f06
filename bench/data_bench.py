"""Section 5 of the benchmark (bench/run.py): the data side, `dtrain prepare` and `--data.prepared`.

    .venv/bin/python bench/run.py --only data              # full mode (~10-12 min on 2 CPU cores)
    .venv/bin/python bench/run.py --quick --only data      # every case once on small corpora (~1.5 min)

The corpus: seeded synthetic plain text, one `{"text": ...}` per line: words drawn from 20,000 pseudo-
words by a Zipf law (7% followed by "." or ","), document lengths long-tailed: 90% log-normal around a
third of max_length, 10% log-uniform between 1x and 20x max_length (256 tokens), so most documents are
short and the long ones are split into many pieces. The 10x corpus is the 1x corpus followed by 9x more
documents from the same generator. The tokenizer: a byte-level BPE (GPT-2's scheme, 8,192 tokens) trained
locally on the 1x corpus, saved next to a tiny random-init Llama (`save_pretrained`); every process
loads that directory, dtrain with `--model.name_or_path DIR`. Recipe (a YAML file per corpus, as a user
writes one): template text, max_length 256, packing true, and the corpus as the one entry of
data.sources with eval_fraction 0 (nothing held out, so every tool reads every document; the
data.path shorthand refuses --data.eval_fraction 0).

Tables
5(i) Tokenization: `dtrain prepare OUT --num-proc N` (the real CLI, `python -m dtrain.cli prepare`)
   against the Hugging Face run_clm recipe on the same corpus with the same tokenizer (bench/data_bench.py
   baseline: `load_dataset("json")`, `.map(tokenize, batched=True, num_proc=N)`, `.map(group_texts,
   batched=True, num_proc=N)` into blocks of max_length), N = 2 and 1, alternately; then dtrain prepare on
   the 10x corpus. Seconds are the whole process, as a user waits for it (imports included); "in-process
   s" leaves out interpreter start and imports (dtrain: the seconds its manifest records; the baseline:
   from load_dataset to the last block). tokens/s = the corpus's text tokens (the tokenizer's count,
   the same numerator for both) / process seconds. Every run has its own empty HF datasets cache, so
   nothing is read back from an earlier run. dtrain writes each document's tokens + its EOS + one
   repeated token per piece boundary (pieces overlap by one token); the run_clm recipe adds no EOS and
   drops each map batch's remainder.
5(ii) Start-up and memory on a prepared corpus: a 2-step run as 2 CPU ranks (`accelerate launch
   --multi_gpu --num_processes 2`, ACCELERATE_USE_CPU=1, gloo) with `--data.prepared DIR`, on the 1x and
   10x corpora alternately. Start-up: launch until metrics.jsonl has its first train row (median over
   repeats). Peak RSS per rank to step 1: each rank's ru_maxrss through start-up and the first step,
   as dtrain logs it (peak_memory_mib_per_rank of the first metrics row; median over repeats). Whole
   run: each rank's VmHWM (/proc/PID/status, polled every 20 ms), lowest and median over repeats; it
   jumps by ~50-100 MiB in step 2 in some runs and not in others at every corpus size (likely how the
   allocator serves the step's logits-sized buffers), which would swamp a 10% goal, so it is shown
   beside it. File-backed pages of the memory-mapped arrays count in both once touched (with large
   page-cache folios a random row read maps up to 2 MiB of tokens.npy). Goals (full mode): 10x over 1x,
   peak RSS to step 1 +10% or less on every rank, start-up +2 s or less.
5(iii) Full mode only: a corpus of >= 100M tokens, generated, prepared with --num-proc 2 (seconds,
   tokens/s, disk bytes per token written), and the same 2-rank 2-step run on it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SELF = Path(__file__).resolve()

MAX_LENGTH = 256
TOKENIZER_VOCAB = 8192
PSEUDO_WORDS = 20000
WORLD = 2  # ranks of the start-up runs
SIZES = {  # documents of the 1x corpus, the scale of the bigger one, repeats; tokens of the large corpus
    "quick": {"docs": 300, "scale": 10, "repeats": 1, "train_repeats": 1, "large_tokens": None},
    "full": {"docs": 10000, "scale": 10, "repeats": 2, "train_repeats": 4, "large_tokens": 100_000_000},
}
KINDS = ("section_data_prepare", "section_data_startup", "section_data_large")


# --------------------------------------------------------------------------------------------
# Subprocesses: `python bench/data_bench.py KIND SPEC.json RESULT.json`
# --------------------------------------------------------------------------------------------


class Corpus:
    """The seeded text generator: Zipf pseudo-words, long-tailed document lengths (in words). The words
    are always the same (the tokenizer is trained on them); `seed` picks the documents."""

    def __init__(self, seed: int, tokens_per_word: float = 1.3):
        import numpy as np

        rng = np.random.default_rng(0)
        letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
        freq = 1.0 / np.arange(1, 27) ** 0.9
        words: set[str] = set()
        while len(words) < PSEUDO_WORDS:
            n = int(rng.geometric(0.22)) + 1  # 2..~20 letters, mostly 3-7
            words.add("".join(rng.choice(letters, size=min(n, 18), p=freq / freq.sum())))
        base = np.array(sorted(words, key=lambda w: (len(w), w)), dtype=object)
        rng.shuffle(base)
        self.words = np.concatenate([base, base + ".", base + ","])
        p = 1.0 / (np.arange(PSEUDO_WORDS) + 2.7) ** 1.07
        self.cdf = np.cumsum(p / p.sum())
        self.rng = rng if seed == 0 else np.random.default_rng(seed)
        self.tokens_per_word = tokens_per_word

    def lengths(self, n: int):
        """Words per document: 90% log-normal around max_length / 3 tokens, 10% log-uniform 1x-20x."""
        import numpy as np

        rng = self.rng
        short = np.clip(rng.lognormal(math.log(MAX_LENGTH / 3), 0.9, n), 8, 4 * MAX_LENGTH)
        long = MAX_LENGTH * np.exp(rng.uniform(0.0, math.log(20.0), n))
        tokens = np.where(rng.random(n) < 0.10, long, short)
        return np.maximum(1, np.round(tokens / self.tokens_per_word)).astype(np.int64)

    def documents(self, n: int):
        """n documents (strings), generated a chunk at a time."""
        import numpy as np

        for first in range(0, n, 4096):
            counts = self.lengths(min(4096, n - first))
            total = int(counts.sum())
            idx = np.searchsorted(self.cdf, self.rng.random(total))
            idx = np.minimum(idx, PSEUDO_WORDS - 1)
            punct = self.rng.random(total)
            idx = idx + PSEUDO_WORDS * (punct < 0.05) + 2 * PSEUDO_WORDS * ((punct >= 0.05) & (punct < 0.07))
            drawn = self.words[idx]
            ends = np.cumsum(counts)
            for a, b in zip(ends - counts, ends, strict=True):
                yield " ".join(drawn[a:b])


def write_docs(fh, docs) -> tuple[int, int, int]:
    """Documents as JSON Lines; returns (documents, words, bytes)."""
    n = words = size = 0
    for text in docs:
        line = json.dumps({"text": text}) + "\n"
        fh.write(line)
        n, words, size = n + 1, words + text.count(" ") + 1, size + len(line)
    return n, words, size


def write_recipe(work: Path, corpus: str, path: Path, model: str) -> str:
    """The recipe a user writes: the model and one data source, nothing held out (--data.eval_fraction
    must be > 0; a source's own eval_fraction may be 0)."""
    recipe = work / f"recipe-{corpus}.yaml"
    recipe.write_text(
        f"model:\n  name_or_path: {model}\n"
        f"data:\n  template: text\n  max_length: {MAX_LENGTH}\n  packing: true\n"
        f"  sources:\n    - {{path: {path}, name: corpus, eval_fraction: 0}}\n"
    )
    return str(recipe)


def setup(spec: dict) -> dict:
    """The 1x and 10x corpora, the BPE tokenizer trained on the 1x corpus, the tiny model, the recipe."""
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    docs, scale = spec["docs"], spec["scale"]
    gen = Corpus(spec["seed"])
    small, big = work / "corpus-1x.jsonl", work / f"corpus-{scale}x.jsonl"
    started = time.perf_counter()
    first = list(gen.documents(docs))
    with open(small, "w") as fh:
        facts_1x = write_docs(fh, first)
    with open(big, "w") as fh:
        write_docs(fh, first)
        rest = write_docs(fh, gen.documents(docs * (scale - 1)))
    generate_s = time.perf_counter() - started

    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    sys.path.insert(0, str(BENCH))
    from cases import save_model

    eos = "<|endoftext|>"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        first, vocab_size=TOKENIZER_VOCAB, min_frequency=2, special_tokens=[eos], show_progress=False
    )
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=eos, eos_token=eos, unk_token=eos)
    model = save_model(
        work / "model", tok, {"hidden": 32, "intermediate": 64, "layers": 2, "heads": 2}, 2 * MAX_LENGTH
    )
    sample = first[: min(len(first), 2000)]
    tokens = sum(len(x) for x in tok(sample)["input_ids"])
    words = sum(t.count(" ") + 1 for t in sample)
    recipes = {
        "1x": write_recipe(work, "1x", small, model["path"]),
        f"{scale}x": write_recipe(work, f"{scale}x", big, model["path"]),
    }
    return {
        "corpora": {
            "1x": {"path": str(small), "documents": facts_1x[0], "words": facts_1x[1], "bytes": facts_1x[2]},
            f"{scale}x": {
                "path": str(big),
                "documents": facts_1x[0] + rest[0],
                "words": facts_1x[1] + rest[1],
                "bytes": facts_1x[2] + rest[2],
            },
        },
        "generate_s": generate_s,
        "tokens_per_word": tokens / words,
        "model": model,
        "recipes": recipes,
    }


def large_corpus(spec: dict) -> dict:
    """A corpus of at least spec["tokens"] tokens (by the words-per-token ratio setup measured, + 3%)."""
    gen = Corpus(spec["seed"], tokens_per_word=spec["tokens_per_word"])
    want_words = spec["tokens"] * 1.03 / spec["tokens_per_word"]
    mean_words = float(gen.lengths(200_000).mean())
    docs = int(want_words / mean_words) + 1
    started = time.perf_counter()
    with open(spec["path"], "w", buffering=1 << 22) as fh:
        n, words, size = write_docs(fh, gen.documents(docs))
    return {
        "path": spec["path"],
        "documents": n,
        "words": words,
        "bytes": size,
        "seconds": time.perf_counter() - started,
    }


def baseline(spec: dict) -> dict:
    """The Hugging Face run_clm recipe: load the json, tokenize with num_proc workers, group the token
    stream into blocks of max_length (labels = input_ids), as transformers'
    examples/pytorch/language-modeling/run_clm.py does (written here, not copied)."""
    started = time.perf_counter()
    import datasets
    import numpy as np
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    block, num_proc = spec["block_size"], spec["num_proc"]
    t0 = time.perf_counter()
    raw = datasets.load_dataset("json", data_files={"train": spec["path"]}, cache_dir=spec["cache"])["train"]

    def tokenize(batch):
        return tok(batch["text"])

    tokenized = raw.map(
        tokenize, batched=True, num_proc=num_proc, remove_columns=raw.column_names, desc="tokenize"
    )

    def group_texts(batch):
        out = {}
        for key, rows in batch.items():
            flat = [t for row in rows for t in row]
            usable = len(flat) // block * block
            out[key] = [flat[i : i + block] for i in range(0, usable, block)]
        out["labels"] = [list(x) for x in out["input_ids"]]
        return out

    blocks = tokenized.map(group_texts, batched=True, num_proc=num_proc, desc="group")
    t1 = time.perf_counter()
    lengths = np.asarray(pc.list_value_length(tokenized.data.column("input_ids")), dtype=np.int64)
    # what dtrain writes of the same documents: each + EOS, split into pieces overlapping by one token
    with_eos = lengths + 1
    pieces = np.where(with_eos <= block, 1, -(-(with_eos - 1) // (block - 1)))
    return {
        "documents": len(raw),
        "text_tokens": int(lengths.sum()),
        "blocks": len(blocks),
        "block_tokens": len(blocks) * block,
        "dtrain_pieces": int(pieces.sum()),
        "in_process_s": t1 - t0,
        "imports_s": t0 - started,
    }


def main(argv: list[str]) -> int:
    kind, spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    fn = {"setup": setup, "large_corpus": large_corpus, "baseline": baseline}[kind]
    result = fn(spec)
    Path(result_path).write_text(json.dumps(result, indent=1))
    return 0


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

    def __call__(self, elapsed: float) -> None:
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
# The sections (bench is bench/run.py's module: Case, run_process, goal, ...)
# --------------------------------------------------------------------------------------------


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def sizes(ctx) -> dict:
    return SIZES["quick" if ctx.plan.mode == "quick" else "full"]


def _state(ctx, bench, say) -> dict:
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
    result = _helper(ctx, bench, "setup", spec, work / "setup")
    st = {**result, "work": str(work), "prepared": {}, "facts": {}}
    ctx.prep["data_bench"] = st
    return st


def _helper(ctx, bench, kind: str, spec: dict, where: Path, timeout: float | None = None) -> dict:
    where.mkdir(parents=True, exist_ok=True)
    (where / "spec.json").write_text(json.dumps(spec, indent=1))
    proc = bench.run_process(
        [sys.executable, str(SELF), kind, str(where / "spec.json"), str(where / "result.json")],
        where / "log.txt",
        bench.subprocess_env(ctx.threads),
        timeout or ctx.plan.timeout,
    )
    if proc.rc != 0 or not (where / "result.json").is_file():
        raise bench.CaseError(f"{kind} exited {proc.rc}: {proc.tail()} (log {proc.log})")
    result = json.loads((where / "result.json").read_text())
    result.update(wall_s=proc.seconds, peak_rss_mib=proc.peak_rss_mib)
    return result


def run_prepare(ctx, bench, recipe: str, num_proc: int, name: str, timeout: float | None = None) -> dict:
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
    env = bench.subprocess_env(ctx.threads, HF_DATASETS_CACHE=str(run / "hf_datasets"))
    proc = bench.run_process(cmd, run / "log.txt", env, timeout or ctx.plan.timeout)
    if proc.rc != 0 or not (out / "manifest.json").is_file():
        raise bench.CaseError(f"dtrain prepare exited {proc.rc}: {proc.tail()} (log {proc.log})")
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


def run_baseline(ctx, bench, st: dict, num_proc: int, name: str) -> dict:
    run = ctx.fresh(name)
    spec = {
        "path": st["corpora"]["1x"]["path"],
        "model": st["model"]["path"],
        "num_proc": num_proc,
        "block_size": MAX_LENGTH,
        "cache": str(run / "hf_datasets"),
    }
    result = _helper(ctx, bench, "baseline", spec, run)
    result["datasets_cache_bytes"] = du(run / "hf_datasets")
    shutil.rmtree(run / "hf_datasets", ignore_errors=True)
    return result


def run_prepared_training(
    ctx, bench, recipe: str, prepared: str, name: str, timeout: float | None = None
) -> dict:
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
        str(bench.free_port()),
        str(bench.TRAIN),
        *args,
    ]
    env = bench.subprocess_env(1, ACCELERATE_USE_CPU="1")
    watch = RankWatch(out)
    proc = bench.run_process(cmd, out / "log.txt", env, timeout or ctx.plan.timeout, watch)
    rows = bench.train_rows(out)
    if proc.rc != 0 or watch.first_row_s is None or len(rows) != 2:
        raise bench.CaseError(f"training on {prepared} exited {proc.rc}: {proc.tail()} (log {proc.log})")
    ranks = watch.per_rank_mib()
    if len(ranks) != WORLD:
        raise bench.CaseError(f"found {len(ranks)} rank processes, not {WORLD}: {ranks} (log {proc.log})")
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


def med(case, key: str):
    values = [r[key] for r in case.repeats if r.get(key) is not None]
    return statistics.median(values) if values else None


def spread(case, key: str):
    values = [r[key] for r in case.repeats if r.get(key) is not None]
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else None


def rank_peaks(case, how=min, key: str = "rank_peak_rss_mib") -> dict[str, float]:
    """Per rank: the lowest (or median, largest) over repeats of one per-rank figure."""
    ranks = sorted({k for r in case.repeats for k in r[key]})
    return {k: how(r[key][k] for r in case.repeats if k in r[key]) for k in ranks}


def sections(bench) -> list:
    """The section functions bench/run.py registers as "data" (kind = the function's name)."""

    def section_data_prepare(ctx, say) -> dict:
        st = _state(ctx, bench, say)
        s = sizes(ctx)
        big = f"{s['scale']}x"

        def prep(num_proc: int, corpus: str = "1x"):
            def go(r):
                result = run_prepare(
                    ctx, bench, st["recipes"][corpus], num_proc, f"data-prepare-{corpus}-np{num_proc}"
                )
                st["prepared"].setdefault(corpus, result["prepared"])  # the first one serves 5(ii)
                return result

            return go

        def base(num_proc: int):
            return lambda r: run_baseline(ctx, bench, st, num_proc, f"data-runclm-np{num_proc}")

        cases = [
            bench.Case("dtrain_np2", "dtrain prepare --num-proc 2", prep(2)),
            bench.Case("runclm_np2", "run_clm map + group_texts, num_proc 2", base(2)),
            bench.Case("dtrain_np1", "dtrain prepare --num-proc 1", prep(1)),
            bench.Case("runclm_np1", "run_clm map + group_texts, num_proc 1", base(1)),
        ]
        bench.run_alternately(cases, s["repeats"], say)
        by = {c.key: c for c in cases}
        text_tokens = next(
            (r["text_tokens"] for c in cases if c.key.startswith("runclm") for r in c.repeats), None
        )
        for c in cases:  # one numerator for every case: the corpus's text tokens as the tokenizer counts them
            for r in c.repeats:
                r["corpus"], r["corpus_text_tokens"] = "1x", text_tokens or r.get("text_tokens")
                r["tokens_per_sec"] = (
                    r["corpus_text_tokens"] / r["wall_s"] if r["corpus_text_tokens"] else None
                )
        scaled = bench.Case(f"dtrain_np2_{big}", f"dtrain prepare --num-proc 2, {big} corpus", prep(2, big))
        bench.run_alternately([scaled], 1, say)
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
        st = _state(ctx, bench, say)
        s = sizes(ctx)
        big = f"{s['scale']}x"
        for corpus in ("1x", big):
            if corpus not in st["prepared"]:  # --only data runs 5(i) first; this is for a failed case there
                say(f"  dtrain prepare {corpus} (for the start-up runs)")
                st["prepared"][corpus] = run_prepare(
                    ctx, bench, st["recipes"][corpus], 2, f"data-prepare-{corpus}"
                )["prepared"]

        def train(corpus: str):
            return lambda r: run_prepared_training(
                ctx, bench, st["recipes"][corpus], st["prepared"][corpus], f"data-train-{corpus}"
            )

        cases = [
            bench.Case("train_1x", "2 ranks, 2 steps, --data.prepared 1x", train("1x")),
            bench.Case(f"train_{big}", f"2 ranks, 2 steps, --data.prepared {big}", train(big)),
        ]
        bench.run_alternately(cases, s["train_repeats"], say)
        judged = ctx.plan.mode != "quick"
        a, b = cases
        goals = []
        first = "rank_first_step_rss_mib"
        pa, pb = (rank_peaks(x, statistics.median, first) if x.repeats else {} for x in (a, b))
        common = [k for k in pa if k in pb and pa[k]]
        rss = max(pb[k] / pa[k] - 1 for k in common) if common else None  # the rank that grew most
        goals.append(
            bench.goal(
                f"peak RSS per rank to step 1, {big} over 1x (worst rank)",
                rss,
                "<= +10%",
                rss is not None and rss <= 0.10,
                judged,
            )
        )
        sa, sb = med(a, "startup_s"), med(b, "startup_s")
        up = (sb - sa) if sa is not None and sb is not None else None
        goals.append(
            bench.goal(f"start-up, {big} minus 1x (s)", up, "<= +2 s", up is not None and up <= 2.0, judged)
        )
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
        st = _state(ctx, bench, say)
        work = Path(st["work"])
        gen = bench.Case("generate", "generate the corpus (jsonl)")
        prep = bench.Case("prepare", "dtrain prepare --num-proc 2")
        train = bench.Case("train", f"{WORLD} ranks, 2 steps, --data.prepared")

        def generate(r):
            spec = {
                "path": str(work / "corpus-large.jsonl"),
                "tokens": want,
                "seed": 1,
                "tokens_per_word": st["tokens_per_word"],
            }
            return _helper(ctx, bench, "large_corpus", spec, work / "large", timeout=3600)

        def prepare(r):
            corpus = work / "corpus-large.jsonl"
            st["recipes"]["large"] = write_recipe(work, "large", corpus, st["model"]["path"])
            result = run_prepare(ctx, bench, st["recipes"]["large"], 2, "data-prepare-large", timeout=7200)
            result["tokens_per_sec"] = result["text_tokens"] / result["wall_s"]
            st["prepared"]["large"] = result["prepared"]
            shutil.rmtree(Path(result["prepared"]).parent / "hf_datasets", ignore_errors=True)
            return result

        gen.run, prep.run = generate, prepare
        train.run = lambda r: run_prepared_training(
            ctx, bench, st["recipes"]["large"], st["prepared"]["large"], "data-train-large", timeout=1800
        )
        for case in (gen, prep, train):
            bench.run_alternately([case], 1, say)
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

    return [section_data_prepare, section_data_startup, section_data_large]


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def fill_table(t, sec: dict, fmt, status_text) -> None:
    """bench/run.py's print_section for the data kinds: columns and rows into the rich Table t."""
    kind, cases = sec["kind"], sec["cases"]
    if kind == "section_data_prepare":
        cols = [
            "case",
            "corpus",
            "documents",
            "text tokens",
            "seconds",
            "±",
            "tokens/s",
            "in-process s",
            "tokens written",
            "peak RSS MiB",
            "disk B/token",
            "note",
        ]
        for col in cols:
            t.add_column(col, justify="left" if col in ("case", "corpus", "note") else "right")
        for c in cases:
            r = c.repeats[0] if c.repeats else {}
            t.add_row(
                c.label,
                r.get("corpus", "-"),
                fmt(r.get("documents"), ","),
                fmt(r.get("corpus_text_tokens"), ","),
                fmt(med(c, "wall_s"), ".2f"),
                fmt(spread(c, "wall_s"), ".0%"),
                fmt(med(c, "tokens_per_sec"), ",.0f"),
                fmt(med(c, "in_process_s"), ".2f"),
                fmt(r.get("tokens") or r.get("block_tokens"), ","),
                fmt(med(c, "peak_rss_mib")),
                fmt(r.get("disk_bytes_per_token"), ".2f"),
                status_text(c),
            )
    elif kind == "section_data_startup":
        for col in (
            "case",
            "documents",
            "tokens",
            "packed rows",
            "start-up s",
            "±",
            "RSS MiB/rank to step 1",
            "whole run: lowest",
            "median",
            "file-backed MiB",
            "wall s",
            "note",
        ):
            t.add_column(col, justify="left" if col in ("case", "note") else "right")
        for c in cases:
            r = c.repeats[0] if c.repeats else {}
            per = lambda d: " / ".join(f"{v:.0f}" for v in d.values()) or "-"  # noqa: E731
            t.add_row(
                c.label,
                fmt(r.get("documents"), ","),
                fmt(r.get("tokens"), ","),
                fmt(r.get("rows"), ","),
                fmt(med(c, "startup_s"), ".2f"),
                fmt(spread(c, "startup_s"), ".0%"),
                per(rank_peaks(c, statistics.median, "rank_first_step_rss_mib")),
                per(rank_peaks(c)),
                per(rank_peaks(c, statistics.median)),
                per(rank_peaks(c, max, "rank_rss_file_mib")),
                fmt(med(c, "wall_s"), ".1f"),
                status_text(c),
            )
    else:
        for col in (
            "step",
            "documents",
            "tokens",
            "seconds",
            "tokens/s",
            "disk B/token",
            "start-up s",
            "peak RSS MiB (per rank: to step 1; whole run)",
            "note",
        ):
            t.add_column(col, justify="left" if col in ("step", "note") else "right")
        for c in cases:
            r = c.repeats[0] if c.repeats else {}
            peaks = fmt(r.get("peak_rss_mib"))
            if "rank_peak_rss_mib" in r:  # training: to step 1, then the whole run, per rank
                step1, whole = (
                    " / ".join(f"{v:.0f}" for v in r[k].values())
                    for k in ("rank_first_step_rss_mib", "rank_peak_rss_mib")
                )
                peaks = f"{step1}; whole run {whole}"
            seconds = r.get("seconds") if c.key == "generate" else r.get("wall_s")
            t.add_row(
                c.label,
                fmt(r.get("documents"), ","),
                fmt(r.get("tokens"), ","),
                fmt(seconds, ".1f"),
                fmt(r.get("tokens_per_sec"), ",.0f"),
                fmt(r.get("disk_bytes_per_token"), ".2f"),
                fmt(r.get("startup_s"), ".2f"),
                peaks,
                status_text(c),
            )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

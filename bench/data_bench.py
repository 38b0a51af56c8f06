"""Section 5 of the benchmark (bench/run.py): the data side, `dtrain prepare` and `--data.prepared`.

    .venv/bin/python bench/run.py --only data              # full mode (~10-12 min on 2 CPU cores)
    .venv/bin/python bench/run.py --quick --only data      # every case once on small corpora (~1.5 min)

This docstring describes the section; the file is the script its subprocesses run (`python
bench/data_bench.py KIND SPEC.json RESULT.json`: the corpora, the tokenizer and model, the run_clm
baseline). The section itself runs from bench/sections/data.py, its tables are drawn by bench/tables.py.

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
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

MAX_LENGTH = 256
TOKENIZER_VOCAB = 8192
PSEUDO_WORDS = 20000


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


if __name__ == "__main__":
    from dtrain.process import exit_with  # the way dtrain's own processes end: like with like

    exit_with(main(sys.argv[1:]))

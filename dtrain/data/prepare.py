"""Prepare: every source tokenized (long text documents split into pieces), packed, and written once as
flat token arrays with an index, then memory-mapped by every rank.

On disk (`dtrain prepare OUT_DIR`, or `<output_dir>/data/prepared` for a run on raw files):

    manifest.json                  what shaped the data (format version, tokenizer, max_length, packing,
                                   each source's settings and fingerprint) and the counts; written last
    <source>/train/tokens.npy      every example's tokens end to end (uint16 or uint32 by vocabulary)
    <source>/train/offsets.npy     example i is tokens[offsets[i]:offsets[i + 1]] (int64)
    <source>/train/targets.npy     chat/alpaca: 1 where the token is trained on (uint8); text trains all
    <source>/train/has_target.npy  example i has a target token besides its first (bool)
    <source>/train/row_offsets.npy, row_items.npy   --data.packing: row r holds examples
                                   row_items[row_offsets[r]:row_offsets[r + 1]]
    <source>/train/row_tokens.npy, row_has_target.npy   per train row (a row is an example unpacked)
    <source>/eval/...              the held-out documents (never packed)
    <source>/generate.json         eval prompts and references for exact match (chat/alpaca)

Why token arrays and not Arrow: a rank maps the files and reads a row as two slices, so start-up and
memory do not grow with the corpus (Arrow's list columns would need their offsets materialised and a
Python object per row to find a length), and the layout is the one Megatron and nanotron use.

The directory is written under a temporary name and renamed when complete, so a half-written one is
never read: without a manifest it is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dtrain.config import Config, DataConfig, SourceConfig, UserError, resolved_sources
from dtrain.data.pack import best_fit_decreasing
from dtrain.data.sources import check_columns, check_rows, load_table, use_chat_template
from dtrain.data.templates import IGNORE_INDEX, encode_batch, generation_item

FORMAT_VERSION = 2  # 1: one source, text truncated at max_length (dtrain before data.sources)
MANIFEST = "manifest.json"
EVAL_SPLIT_SEED = 0  # held-out documents do not depend on --train.seed: the seed is a run setting
GENERATE_ROWS = 1024  # eval prompts kept for exact match (eval.num_generate takes the first ones)
_BATCH = 4096  # examples per Arrow batch while writing the arrays


# --------------------------------------------------------------------------------------------
# What shapes the data: the manifest's key
# --------------------------------------------------------------------------------------------


def source_data_config(data: DataConfig, s: SourceConfig) -> DataConfig:
    """The data section as one source sees it (templates and checks read a DataConfig)."""
    # resolved_sources filled these in
    assert s.template is not None and s.text_column is not None and s.messages_column is not None
    assert s.split is not None
    return replace(
        data,
        path=s.path,
        eval_path=s.eval_path,
        sources=None,
        template=s.template,
        text_column=s.text_column,
        messages_column=s.messages_column,
        chat_template=s.chat_template,
        split=s.split,
    )


def fingerprint(path: str | None) -> dict | None:
    """A source as it is now: size and modification time of its file(s); a hub id by name."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_file():
        st = p.stat()
        return {"path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    if p.is_dir():
        h, total = hashlib.sha256(), 0
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            total += st.st_size
        return {"path": str(p.resolve()), "bytes": total, "files_sha256": h.hexdigest()[:16]}
    return {"hub": path}


def tokenizer_fingerprint(tokenizer) -> str:
    """What the tokenizer maps text to: its full definition (fast tokenizers) or vocabulary, and its
    special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        [
            type(tokenizer).__name__,
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            len(tokenizer),
        ]
    )
    return hashlib.sha256((body + extra).encode()).hexdigest()[:16]


def _text_sha(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:16] if path else None


def source_key(s: SourceConfig) -> dict:
    """Everything about one source that changes its tokens (its weight does not: the blend is computed
    at run time)."""
    assert s.template is not None  # resolved_sources filled it in
    columns = {
        "text": {"text_column": s.text_column},
        "chat": {"messages_column": s.messages_column},
        "alpaca": {},
    }[s.template]
    return {
        "name": s.name,
        "template": s.template,
        **columns,
        "chat_template_sha256": _text_sha(s.chat_template) if s.template == "chat" else None,
        "split": s.split,
        "train": fingerprint(s.path),
        "eval": fingerprint(s.eval_path),
        "eval_fraction": None if s.eval_path else s.eval_fraction,
    }


def data_key(cfg: Config, tokenizer, sources: list[SourceConfig]) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": cfg.data.max_length,
        "packing": cfg.data.packing,
        "sources": [source_key(s) for s in sources],
    }


def stream_change(version: int, cfg: Config) -> str | None:
    """Why a checkpoint written under data format `version` would read other data at the same position
    in this dtrain (None when its stream is unchanged)."""
    if version == FORMAT_VERSION:
        return None
    sources = resolved_sources(cfg.data)
    embedded = not sources and cfg.data.prepared is None
    unchanged = embedded or (len(sources) == 1 and sources[0].template != "text" and sources[0].eval_path)
    if version == 1 and unchanged:
        return None  # one chat/alpaca source with its own eval data: the same rows in the same order
    return (
        f"it was written with dtrain's data format {version}, and this dtrain builds the stream differently "
        "(text documents split into pieces instead of cut, the eval split fixed, sources blended), so the "
        "same data position would read other data"
    )


def differences(have: dict, want: dict) -> list[str]:
    """What differs between a manifest's key and this run's, in the user's words."""
    out = []
    if have.get("format_version") != want["format_version"]:
        out.append(
            f"it was written by another dtrain data format ({have.get('format_version')}, this dtrain "
            f"writes {want['format_version']})"
        )
    if have.get("tokenizer") != want["tokenizer"]:
        out.append("it was tokenized by another tokenizer (--model.tokenizer / --model.name_or_path)")
    for key, flag in (("max_length", "data.max_length"), ("packing", "data.packing")):
        if have.get(key) != want[key]:
            out.append(f"--{flag} is {str(want[key]).lower()} here, {str(have.get(key)).lower()} there")
    old = {s["name"]: s for s in have.get("sources", [])}
    new = {s["name"]: s for s in want["sources"]}
    if set(old) != set(new):
        out.append(f"it holds sources {', '.join(old) or 'none'}, this run has {', '.join(new)}")
    for name in set(old) & set(new):
        a, b = old[name], new[name]
        for part, what in (("train", "path"), ("eval", "eval_path")):
            if a[part] != b[part]:
                where = (b[part] or a[part] or {}).get("path") or (b[part] or a[part] or {}).get("hub")
                out.append(f"source '{name}' ({what} {where}) changed since it was prepared")
        changed = [k for k in a if k not in ("name", "train", "eval") and a[k] != b.get(k)]
        if changed:
            out.append(f"source '{name}' has other settings ({', '.join(changed)})")
    return out


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _features(chat_like: bool):
    import datasets

    f = {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "truncated": datasets.Value("bool"),
        "document": datasets.Value("int64"),
    }
    if chat_like:
        f["targets"] = datasets.Sequence(datasets.Value("uint8"))
    else:
        f["trained"] = datasets.Value("bool")
    return datasets.Features(f)


def _tokenize(raw, tokenizer, dcfg: DataConfig, num_proc: int, desc: str, scratch: Path):
    """`datasets.map` with num_proc workers: ids as int32, the target mask as uint8 (chat/alpaca) or one
    flag per example (text: every token is a target, a null row trains nothing). Its Arrow output goes to
    `scratch` (inside the directory being written, removed once the arrays are), not the datasets cache,
    where it would outlive its use at several times the size of the arrays."""
    chat_like = dcfg.template != "text"

    def encode(batch):
        out = encode_batch(batch, tokenizer, dcfg)
        result = {"input_ids": out["input_ids"], "truncated": out["truncated"], "document": out["document"]}
        if chat_like:
            result["targets"] = [[int(t != IGNORE_INDEX) for t in labels] for labels in out["labels"]]
        else:
            result["trained"] = [bool(labels) and labels[-1] != IGNORE_INDEX for labels in out["labels"]]
        return result

    scratch.parent.mkdir(parents=True, exist_ok=True)
    return raw.map(
        encode,
        batched=True,
        remove_columns=raw.column_names,
        features=_features(chat_like),
        num_proc=num_proc if num_proc > 1 and len(raw) >= 2 * num_proc else None,
        desc=desc,
        cache_file_name=str(scratch),
    )


def _write_split(ds, out: Path, vocab: int, packing_capacity: int | None) -> dict:
    """The tokenized split as flat arrays (one Arrow batch at a time: memory bounded by the batch)."""
    import pyarrow.compute as pc
    from numpy.lib.format import open_memmap

    out.mkdir(parents=True)
    table = ds.with_format("arrow")
    lengths = np.asarray(pc.list_value_length(ds.data.column("input_ids")), dtype=np.int64)
    n, total = len(lengths), int(lengths.sum())
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    tokens = open_memmap(out / "tokens.npy", mode="w+", dtype=dtype, shape=(total,))
    chat_like = "targets" in ds.column_names
    targets = (
        open_memmap(out / "targets.npy", mode="w+", dtype=np.uint8, shape=(total,)) if chat_like else None
    )
    has_target = np.zeros(n, dtype=bool)
    truncated = 0
    for first in range(0, n, _BATCH):
        batch = table[first : first + _BATCH]
        a, b = offsets[first], offsets[min(first + _BATCH, n)]
        tokens[a:b] = pc.list_flatten(batch["input_ids"]).to_numpy(zero_copy_only=False)
        lens = lengths[first : first + _BATCH]
        if targets is not None:  # chat-like
            flags = pc.list_flatten(batch["targets"]).to_numpy(zero_copy_only=False).astype(np.uint8)
            targets[a:b] = flags
            csum = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
            starts = offsets[first : first + len(lens)] - a
            has_target[first : first + len(lens)] = (
                csum[starts + lens] - csum[np.minimum(starts + 1, starts + lens)]
            ) > 0
        else:
            has_target[first : first + len(lens)] = batch["trained"].to_numpy(zero_copy_only=False) & (
                lens > 1
            )
        truncated += int(pc.sum(batch["truncated"]).as_py() or 0)
    tokens.flush()
    if targets is not None:
        targets.flush()
    np.save(out / "offsets.npy", offsets)
    np.save(out / "has_target.npy", has_target)
    stats: dict[str, int | float] = {
        "examples": n,
        "tokens": total,
        "truncated": truncated,
        "without_target": int(n - has_target.sum()),
        "longest": int(lengths.max()) if n else 0,
    }
    if packing_capacity is not None:
        row_offsets, row_items = best_fit_decreasing(lengths, packing_capacity)
        np.save(out / "row_offsets.npy", row_offsets)
        np.save(out / "row_items.npy", row_items.astype(np.int32 if n < 2**31 else np.int64))
        row_tokens = np.add.reduceat(lengths[row_items], row_offsets[:-1]) if n else np.zeros(0, np.int64)
        row_has = (
            np.add.reduceat(has_target[row_items].astype(np.int64), row_offsets[:-1]) > 0
            if n
            else np.zeros(0, bool)
        )
        stats.update(
            rows=len(row_offsets) - 1,
            fill=round(total / max(1, (len(row_offsets) - 1) * packing_capacity), 4),
        )
    else:
        row_tokens, row_has = lengths, has_target
        stats["rows"] = n
    np.save(out / "row_tokens.npy", row_tokens.astype(np.int32))
    np.save(out / "row_has_target.npy", row_has)
    return stats


def prepare_source(cfg: Config, s: SourceConfig, tokenizer, out: Path, num_proc: int, flag: str) -> dict:
    """Load and check one source, split off its eval documents, tokenize both, write them under out.
    `flag` names the source in messages: "data." (the data.path shorthand) or "data.sources[i]."."""
    assert s.split is not None and s.eval_fraction is not None  # resolved_sources filled them in
    dcfg = source_data_config(cfg.data, s)
    raw = load_table(s.path, s.split, flag + "path")
    check_columns(raw, dcfg, s.path, flag + "path")
    check_rows(raw, dcfg, s.path, flag + "path")
    tok = tokenizer
    if s.template == "chat":
        import copy

        tok = copy.copy(tokenizer)  # a source's own chat template must not leak into another source
        use_chat_template(tok, dcfg, raw, s.path, flag + "path")
    raw_eval = None
    if s.eval_path:
        raw_eval = load_table(s.eval_path, s.split, flag + "eval_path")
        check_columns(raw_eval, dcfg, s.eval_path, flag + "eval_path")
        check_rows(raw_eval, dcfg, s.eval_path, flag + "eval_path")
    elif s.eval_fraction > 0 and len(raw) >= 2:  # by document, before any is split into pieces
        parts = raw.train_test_split(test_size=s.eval_fraction, seed=EVAL_SPLIT_SEED)
        raw, raw_eval = parts["train"], parts["test"]
    vocab = len(tokenizer)
    capacity = cfg.data.max_length if cfg.data.packing else None
    scratch = out / "_tokenized"
    train = _tokenize(raw, tok, dcfg, num_proc, f"tokenizing {s.name}", scratch / "train.arrow")
    info = {"documents": len(raw), **_write_split(train, out / "train", vocab, capacity)}
    del train
    if not info["examples"] or info["without_target"] == info["examples"]:
        raise UserError(
            f"--data.max_length {cfg.data.max_length}: none of the {info['examples']} train examples of "
            f"--{flag}path '{s.path}' keeps a token to learn (no response, or a response that starts beyond "
            "max_length); raise --data.max_length or check that the data has responses"
        )
    result = {
        "train": info,
        "eval": None,
        "chat_template": tok.chat_template if s.template == "chat" else None,
    }
    if raw_eval is not None and len(raw_eval):
        evalset = _tokenize(
            raw_eval, tok, dcfg, num_proc, f"tokenizing {s.name} eval", scratch / "eval.arrow"
        )
        result["eval"] = {"documents": len(raw_eval), **_write_split(evalset, out / "eval", vocab, None)}
        del evalset
        items = []
        if s.template != "text":
            for row in raw_eval.select(range(min(GENERATE_ROWS, len(raw_eval)))):
                item = generation_item(row, tok, dcfg)
                if item is not None:
                    items.append(item)
        (out / "generate.json").write_text(json.dumps(items))
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def write_prepared(
    cfg: Config, tokenizer, sources: list[SourceConfig], out: Path, num_proc: int, flags: list[str], say=print
) -> dict:
    """Tokenize and pack every source into out, atomically: written under a temporary name, the manifest
    last, then renamed. Returns the manifest."""
    out = out.expanduser()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    try:
        manifest = {
            **data_key(cfg, tokenizer, sources),
            "sources_data": {},
            "weights": {},
            "host": node_name(),
        }
        for s, flag in zip(sources, flags, strict=True):
            assert s.name is not None  # resolved_sources filled it in
            manifest["sources_data"][s.name] = prepare_source(cfg, s, tokenizer, tmp / s.name, num_proc, flag)
            manifest["weights"][s.name] = s.weight
        manifest["seconds"] = round(time.perf_counter() - started, 2)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():  # only ever a stale cache of dtrain's own (the callers refuse anything else)
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tokens = sum(v["train"]["tokens"] for v in manifest["sources_data"].values())
    say(
        f"dtrain: prepared {len(sources)} source(s), {tokens:,} train tokens, in {manifest['seconds']:.1f} s "
        f"-> {out}"
    )
    return manifest


def check_manifest(manifest: dict, cfg: Config, tokenizer, sources: list[SourceConfig], path: Path) -> None:
    """Refuse a prepared directory that is not this run's data, naming what differs. With no sources in
    the recipe, the directory's own sources are used as they are."""
    want = data_key(cfg, tokenizer, sources)
    have = manifest
    if not sources:
        have = {**manifest, "sources": []}
    problems = differences(have, want)
    if problems:
        raise UserError(
            f"--data.prepared {path} does not match this run: {'; '.join(problems)}; run `dtrain prepare` again "
            "with this run's settings, or point --data.prepared at a directory prepared for them"
        )


def manifest_matches(cache: Path, key: dict) -> dict | None:
    try:
        manifest = json.loads((cache / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if {k: manifest.get(k) for k in key} == key else None


def node_name() -> str:
    """This node as the log names it: Slurm's node name, else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def read_manifest(path: Path, flag: str = "data.prepared") -> dict:
    """A complete prepared directory's manifest, or one line saying why it cannot be used."""
    m = path / MANIFEST
    if not m.is_file():
        raise UserError(
            f"--{flag}: '{path}' has no {MANIFEST}: it is not a dtrain prepare directory, or one whose writing "
            "did not finish; run `dtrain prepare` again"
        )
    try:
        return json.loads(m.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--{flag}: '{m}' is unreadable ({exc}); run `dtrain prepare` again") from None


# --------------------------------------------------------------------------------------------
# Reading: memory-mapped arrays
# --------------------------------------------------------------------------------------------


class Split(torch.utils.data.Dataset):
    """One source's train or eval split, memory-mapped. Item r is row r: a list of examples when packed,
    else one example {input_ids, labels} (numpy int64)."""

    def __init__(self, path: Path, template: str):
        self.path = path
        load = lambda name: np.load(path / f"{name}.npy", mmap_mode="r")  # noqa: E731
        self.tokens, self.offsets, self.has_target = load("tokens"), load("offsets"), load("has_target")
        self.targets = load("targets") if (path / "targets.npy").is_file() else None
        self.packed = (path / "row_offsets.npy").is_file()
        self.row_offsets = load("row_offsets") if self.packed else None
        self.row_items = load("row_items") if self.packed else None
        self.row_tokens, self.row_has_target = load("row_tokens"), load("row_has_target")
        self.template = template

    def __len__(self) -> int:
        return len(self.row_tokens)

    def __reduce__(self):  # DataLoader workers under spawn map the files again instead of copying them
        return (Split, (self.path, self.template))

    @property
    def num_examples(self) -> int:
        return len(self.has_target)

    def example(self, i: int) -> dict:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = np.asarray(self.tokens[a:b], dtype=np.int64)
        if self.targets is not None:
            labels = np.where(self.targets[a:b] > 0, ids, IGNORE_INDEX)
        elif self.has_target[i]:
            labels = ids.copy()
        else:
            labels = np.full_like(ids, IGNORE_INDEX)
        return {"input_ids": ids, "labels": labels}

    def __getitem__(self, r: int):
        if not self.packed:
            return self.example(int(r))
        assert self.row_offsets is not None and self.row_items is not None  # loaded when packed
        a, b = int(self.row_offsets[r]), int(self.row_offsets[r + 1])
        return [self.example(int(i)) for i in self.row_items[a:b]]


@dataclass
class Prepared:
    """A prepared directory opened for a run."""

    path: Path
    manifest: dict
    names: list[str]
    train: list[Split]
    eval: dict[str, Split]
    generate: list[dict]
    cache: Path | None = None  # the run's own cache under <output_dir>/data/prepared/ (not --data.prepared)
    created: bool = False  # written by this start


def open_prepared(path: Path, manifest: dict, num_generate: int) -> Prepared:
    names = [s["name"] for s in manifest["sources"]]
    templates = {s["name"]: s["template"] for s in manifest["sources"]}
    train = [Split(path / n / "train", templates[n]) for n in names]
    evals = {n: Split(path / n / "eval", templates[n]) for n in names if (path / n / "eval").is_dir()}
    generate: list[dict] = []
    for n in names:
        g = path / n / "generate.json"
        items = json.loads(g.read_text()) if g.is_file() else []
        if len(names) > 1:
            items = [
                {**it, "task": n if it.get("task") in (None, "all") else f"{n}/{it['task']}"} for it in items
            ]
        generate += items
    return Prepared(path, manifest, names, train, evals, generate[:num_generate])


# --------------------------------------------------------------------------------------------
# `dtrain prepare`
# --------------------------------------------------------------------------------------------

PREPARE_USAGE = """usage: dtrain prepare --config RECIPE OUT_DIR [--num-proc N] [training flags]

Tokenize (and, with --data.packing true, pack) every source of the recipe once, with N worker processes,
into OUT_DIR with a manifest; then train with --data.prepared OUT_DIR: every rank maps the arrays and
nothing is tokenized again. The training flags are those of `dtrain train` (the data and model ones
matter here). OUT_DIR is written under a temporary name and renamed when complete.
"""


def split_prepare_args(argv: list[str]) -> tuple[str | None, int | None, list[str]]:
    """OUT_DIR (the one bare argument that is not a flag's value), --num-proc, and the training flags."""
    out, num_proc, rest, i = None, None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--num-proc", "--num_proc") and i + 1 < len(argv):
            num_proc, i = _int_arg(arg, argv[i + 1]), i + 2
            continue
        if arg.startswith(("--num-proc=", "--num_proc=")):
            num_proc, i = _int_arg("--num-proc", arg.split("=", 1)[1]), i + 1
            continue
        if arg.startswith("--") and "=" not in arg and arg != "--print_config":
            rest += argv[i : i + 2]
            i += 2
            continue
        if arg.startswith("-") or out is not None:
            rest.append(arg)
        else:
            out = arg
        i += 1
    return out, num_proc, rest


def _int_arg(flag: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"{flag} must be a whole number >= 1 (got '{value}')")
    return n


def prepare_main(argv: list[str]) -> int:
    from dtrain.config import parse_config
    from dtrain.data.sources import run_sources
    from dtrain.modeling import build_tokenizer

    if not argv or argv[0] in ("-h", "--help"):
        print(PREPARE_USAGE, end="")
        return 0 if argv else 2
    out, num_proc, rest = split_prepare_args(argv)
    if out is None:
        raise UserError("dtrain prepare: give OUT_DIR, the directory to write (see dtrain prepare --help)")
    cfg = parse_config(rest)
    if cfg.data.prepared is not None:
        raise UserError("dtrain prepare: --data.prepared is what prepare writes; drop it and give OUT_DIR")
    if cfg.data.path is None and not cfg.data.sources:
        raise UserError("dtrain prepare: the recipe names no data; set --data.path or data.sources")
    sources, flags = run_sources(cfg)
    tokenizer = build_tokenizer(cfg.model)
    target = Path(out).expanduser()
    key = data_key(cfg, tokenizer, sources)
    if target.exists():
        if (target / MANIFEST).is_file() and manifest_matches(target, key) is not None:
            print(f"dtrain: {target} already holds this data, prepared by the same settings; nothing to do")
            return 0
        if not target.is_dir() or any(target.iterdir()):
            raise UserError(
                f"dtrain prepare: OUT_DIR '{out}' already exists and holds other files; nothing was changed: "
                "remove it or choose another OUT_DIR"
            )
        target.rmdir()
    manifest = write_prepared(cfg, tokenizer, sources, target, num_proc or cfg.data.num_proc, flags)
    for name, info in manifest["sources_data"].items():
        t = info["train"]
        fill = f", {t['rows']:,} packed rows ({t['fill']:.1%} full)" if "fill" in t else ""
        print(
            f"dtrain:   {name}: {info['train']['documents']:,} documents -> {t['examples']:,} examples, "
            f"{t['tokens']:,} tokens{fill}"
            + (f"; eval {info['eval']['examples']:,} examples" if info["eval"] else "")
        )
    return 0

"""Data: the user's sources -> one prefix-stable stream of train rows, and the eval sets. The modules
follow the data:

    sources.py    read and check one user table (file, directory, saved dataset, hub id)
    templates.py  a row -> input_ids and labels (chat, alpaca, text; long text split into pieces)
    prepare.py    tokenize, split, pack every source once; write and map the token arrays + manifest;
                  `dtrain prepare`
    cache.py      a run's own prepared cache: made once by the main process, the other ranks wait
    pack.py       best-fit-decreasing packing of one source's examples into rows (arrays)
    blend.py      many sources -> one stream of draws whose token shares follow the weights
    order.py      draws -> rows (a seeded permutation per epoch of each source), this rank's batches
    collate.py    rows -> tensors (padded or packed), eval batches

`train.py` sees one call, `load_run_data`, which returns the train stream and the eval sets.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dtrain.config import Config, SourceConfig, UserError
from dtrain.data.cache import drop_stale_caches, prepare_once
from dtrain.data.collate import (  # noqa: F401  (the data API)
    Collator,
    PackedCollator,
    check_isolation,
    eval_batches,
    probe_rows,
    rank_shard,
    train_collator,
)
from dtrain.data.order import DataOrder, GlobalBatchSampler, train_loader  # noqa: F401
from dtrain.data.prepare import FORMAT_VERSION, Prepared, Split, data_key, open_prepared
from dtrain.data.sources import load_table, run_sources, write_embedded_data  # noqa: F401
from dtrain.data.templates import (  # noqa: F401
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    alpaca_prompt,
    encode,
    encode_batch,
    generation_item,
    has_target,
)


class TrainRows(torch.utils.data.Dataset):
    """Every source's train rows under one numbering (source 0's rows, then source 1's, ...)."""

    def __init__(self, splits: list[Split]):
        self.splits = splits
        self.base = np.concatenate([[0], np.cumsum([len(s) for s in splits])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.base[-1])

    def __getitem__(self, row: int):
        s = int(np.searchsorted(self.base, row, side="right") - 1)
        return self.splits[s][int(row - self.base[s])]

    def lookup(self, rows: np.ndarray, what: str) -> np.ndarray:
        """A per-row array (row_tokens, row_has_target) read at global row ids."""
        src = np.searchsorted(self.base, rows, side="right") - 1
        out = np.empty(len(rows), dtype=np.int64)
        for i in np.unique(src):
            at = src == i
            out[at] = getattr(self.splits[i], what)[rows[at] - self.base[i]]
        return out

    def examples(self, n: int) -> list[dict]:
        """The first n examples of source 0 (the probes before the first step)."""
        split = self.splits[0]
        return [split.example(i) for i in range(min(n, split.num_examples))]


@dataclass
class Window:
    """What a global window of positions holds, known on every rank from the order alone (no sync)."""

    has_targets: bool
    rows: np.ndarray  # per source: rows drawn
    tokens: np.ndarray  # per source: tokens in those rows (padding excluded)


@dataclass
class Data:
    train: TrainRows
    eval: dict[str, Split]  # per source with held-out data
    order: DataOrder
    names: list[str]
    weights: list[float]
    generate: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    chat_template: str | None = None  # the first chat source's template (saved with the tokenizer)
    cache: Path | None = None  # the run's cache of prepared data in the output directory
    created: bool = False  # written by this start

    @contextmanager
    def discarded_on_error(self, accelerator):
        """A start that fails (a bad model, say) removes the cache it prepared, so a run that never began
        leaves the output directory as it found it; one that starts drops the caches it no longer uses."""
        try:
            yield
        except BaseException:
            if self.created and accelerator.is_main_process:
                shutil.rmtree(self.cache, ignore_errors=True)
            raise
        if self.cache is not None and accelerator.is_main_process:
            drop_stale_caches(self.cache)

    def window(self, start: int, size: int) -> Window:
        rows = self.order.indices(start, size)
        src = self.order.source_of(rows)
        tokens = self.train.lookup(rows, "row_tokens")
        k = len(self.names)
        return Window(
            has_targets=bool(self.train.lookup(rows, "row_has_target").any()),
            rows=np.bincount(src, minlength=k),
            tokens=np.bincount(src, weights=tokens, minlength=k).astype(np.int64),
        )

    def describe(self) -> str:
        """The start-up line's account of the data: `20,000 train examples, none truncated; 256 eval
        examples` (with packing: the rows and their fill; text split into pieces: the documents)."""
        st = self.stats
        cut = st["train_truncated"]
        parts = [f"{st['train_examples']:,} train examples"]
        if st["train_documents"] != st["train_examples"]:
            parts[0] += f" from {st['train_documents']:,} documents"
        parts.append("none truncated" if not cut else f"{cut:,} truncated to --data.max_length")
        if "packed_rows" in st:
            parts.append(f"packed into {st['packed_rows']:,} rows ({st['packing_fill']:.0%} full)")
        line = ", ".join(parts)
        if "eval_examples" in st:
            line += f"; {st['eval_examples']:,} eval examples"
        return line

    def mix(self, positions: int) -> str:
        """The start-up line of a mixture: each source's token share and how many of its epochs the run
        reads (above 1: oversampled, reshuffled each epoch; below 1: undersampled)."""
        parts = []
        for name in self.names:
            info = self.stats["sources"][name]
            epochs = positions * info["row_share"] / max(1, info["rows"])
            parts.append(f"{name} {info['target_share']:.1%} of tokens ({epochs:.2f} epochs)")
        return "dtrain: data sources: " + ", ".join(parts)

    def realised(self, source_rows: list[int], source_tokens: list[int]) -> dict:
        """The shares the run has consumed so far, beside the targets (empty for one source)."""
        if len(self.names) < 2 or not source_tokens:
            return {}
        total = max(1, sum(source_tokens))
        return {
            n: {
                "rows": r,
                "tokens": t,
                "token_share": round(t / total, 4),
                "target_share": self.stats["sources"][n]["target_share"],
            }
            for n, r, t in zip(self.names, source_rows, source_tokens, strict=True)
        }


def load_run_data(cfg: Config, tokenizer, accelerator) -> Data:
    """The run's data: a --data.prepared directory, or the sources prepared once for the whole job (on
    the global main process; the other ranks wait for it without a collective that can time out), then
    memory-mapped on every rank."""
    sources, flags = run_sources(cfg)
    embedded = cfg.data.path is None and not cfg.data.sources and cfg.data.prepared is None
    prepared = prepare_once(
        cfg,
        tokenizer,
        accelerator,
        sources,
        flags,
        before=(lambda: write_embedded_data(cfg)) if embedded else None,
    )
    data = assemble(cfg, prepared, sources)
    data.cache, data.created = prepared.cache, prepared.created
    return data


def assemble(cfg: Config, prepared: Prepared, sources: list[SourceConfig]) -> Data:
    """Open the prepared arrays as the run's train stream (the blend by the run's weights) and eval sets."""
    m = prepared.manifest
    weights_by_name = {s.name: s.weight for s in sources} or m.get("weights", {})
    names = prepared.names
    weights = [float(weights_by_name.get(n, 1.0)) for n in names]
    train = TrainRows(prepared.train)
    sizes = [len(s) for s in prepared.train]
    mean_tokens = [
        m["sources_data"][n]["train"]["tokens"] / max(1, len(s))
        for n, s in zip(names, prepared.train, strict=True)
    ]
    from dtrain.data.blend import row_shares

    shares = row_shares(weights, mean_tokens)
    order = DataOrder(sizes, cfg.train.seed, shares if len(names) > 1 else None)
    info = [m["sources_data"][n] for n in names]
    total = lambda part, key: sum((i[part] or {}).get(key, 0) for i in info)  # noqa: E731
    stats = {
        "train_documents": total("train", "documents"),
        "train_examples": total("train", "examples"),
        "train_tokens": total("train", "tokens"),
        "train_truncated": total("train", "truncated"),
        "train_without_target": total("train", "without_target"),
        "longest_example": max(max(i["train"]["longest"], (i["eval"] or {}).get("longest", 0)) for i in info),
        "tokenize_cache": prepared.manifest.get("cache", "prepared"),
    }
    if cfg.data.packing:
        stats.update(
            packed_rows=len(train),
            packing_fill=round(stats["train_tokens"] / max(1, len(train) * cfg.data.max_length), 4),
        )
    if prepared.eval:
        stats.update(
            eval_documents=total("eval", "documents"),
            eval_examples=total("eval", "examples"),
            eval_truncated=total("eval", "truncated"),
        )
    if len(names) > 1:
        wsum = sum(weights)
        stats["sources"] = {
            n: {
                "weight": w,
                "target_share": round(w / wsum, 4),
                "row_share": round(float(r), 4),
                "rows": sz,
                "tokens": i["train"]["tokens"],
                "documents": i["train"]["documents"],
            }
            for n, w, r, sz, i in zip(names, weights, shares, sizes, info, strict=True)
        }
    warnings = check_targets(stats["train_examples"], stats["train_without_target"], cfg.data.max_length)
    chat = next((i.get("chat_template") for i in info if i.get("chat_template")), None)
    return Data(train, prepared.eval, order, names, weights, prepared.generate, stats, warnings, chat)


def check_targets(examples: int, without: int, max_length: int) -> list[str]:
    """Warn about examples that train nothing (data that trains nothing at all is refused by prepare)."""
    if not without:
        return []
    if without == examples:
        raise UserError(
            f"--data.max_length {max_length}: none of the {examples} train examples keeps a token to learn "
            "(no response, or a response that starts beyond max_length); raise --data.max_length or check "
            "that the data has responses"
        )
    return [
        f"dtrain: warning: {without} of {examples} train examples ({without / examples:.1%}) have no token to "
        f"learn after truncation to --data.max_length {max_length}; they are read but train nothing"
    ]


__all__ = [
    "Data",
    "DataOrder",
    "FORMAT_VERSION",
    "TrainRows",
    "Window",
    "assemble",
    "data_key",
    "load_run_data",
    "open_prepared",
]

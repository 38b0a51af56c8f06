"""Data: the user's table (datasource) through a template (templates) into tokenized examples, then the
resumable global order and batches without waste.

The train order is a pure function of (seed, samples consumed): an endless stream of seeded
per-epoch permutations, cut into global batches, each rank taking its slice. The data position
is therefore one integer (`samples_seen`) that survives a restart and a change of world size,
and nothing already consumed is re-read on resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dtrain.config import DataConfig, UserError
from dtrain.datasource import (  # noqa: F401  (load_table re-exported)
    check_columns,
    check_rows,
    load_table,
    use_chat_template,
)
from dtrain.packing import PackedCollator, PackedDataset
from dtrain.templates import (  # noqa: F401  (re-exported: the templates are part of the data API)
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    alpaca_prompt,
    encode,
    encode_batch,
    generation_item,
    has_target,
)


@dataclass
class Data:
    train: object  # datasets.Dataset with input_ids, labels; a PackedDataset of rows with --data.packing
    eval: object | None
    generate: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    with_target: list[bool] | None = None  # per train example; None when every example has a target

    def window_has_targets(self, order: DataOrder, start: int, size: int) -> bool:
        """Whether the global window of `size` examples from data position `start` has any target
        token. Known on every rank from the data order alone: no communication, no device sync."""
        if self.with_target is None:
            return True
        return any(self.with_target[order.index(p)] for p in range(start, start + size))


def tokenize(ds, tokenizer, cfg: DataConfig, what: str):
    """Tokenize through `datasets.map`, whose cache (keyed by the data, the tokenizer and the settings)
    makes a second run on the same data skip the work. Returns (dataset, truncated, without target,
    cache: "hit", "miss" or "off" for data held in memory)."""
    cached_before = {Path(f["filename"]).parent for f in ds.cache_files}
    existing = {p for d in cached_before for p in d.glob("cache-*.arrow")}
    out = ds.map(
        lambda batch: encode_batch(batch, tokenizer, cfg),
        batched=True,
        remove_columns=ds.column_names,
        desc=f"tokenizing {what}",
    )
    files = {Path(f["filename"]) for f in out.cache_files}
    cache = "off" if not cached_before or not files else ("hit" if files <= existing else "miss")
    truncated = int(sum(out["truncated"]))
    no_target = int(sum(1 for labels in out["labels"] if all(t == IGNORE_INDEX for t in labels[1:])))
    return out.remove_columns("truncated"), truncated, no_target, cache


def longest(ds) -> int:
    """Tokens in the longest example (read from the Arrow column, no Python lists)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(ds.with_format("arrow")["input_ids"])
    return int(pc.max(lengths).as_py() or 0)


def build_data(
    cfg: DataConfig, tokenizer, train_path: str, eval_path: str | None, seed: int, num_generate: int
) -> Data:
    """Load, check, split and tokenize. Called on the main process first (datasets caches the result)."""
    raw = load_table(train_path, cfg.split, "data.path")
    check_columns(raw, cfg, train_path, "data.path")
    check_rows(raw, cfg, train_path, "data.path")
    use_chat_template(tokenizer, cfg, raw, train_path, "data.path")
    if eval_path:
        raw_eval = load_table(eval_path, cfg.split, "data.eval_path")
        check_columns(raw_eval, cfg, eval_path, "data.eval_path")
        check_rows(raw_eval, cfg, eval_path, "data.eval_path")
        use_chat_template(tokenizer, cfg, raw_eval, eval_path, "data.eval_path")
    elif len(raw) >= 2:
        parts = raw.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        raw, raw_eval = parts["train"], parts["test"]
    else:
        raw_eval = None
    train, trunc, no_target, cache = tokenize(raw, tokenizer, cfg, "train")
    stats = {"train_examples": len(train), "train_truncated": trunc, "train_without_target": no_target,
             "longest_example": longest(train), "tokenize_cache": cache}  # fmt: skip
    warnings = check_targets(len(train), no_target, cfg.max_length)
    evalset = None
    generate: list[dict] = []
    if raw_eval is not None:
        evalset, etrunc, _, _ = tokenize(raw_eval, tokenizer, cfg, "eval")
        stats.update(eval_examples=len(evalset), eval_truncated=etrunc)
        stats["longest_example"] = max(stats["longest_example"], longest(evalset))
        for row in raw_eval.select(range(min(num_generate, len(raw_eval)))):
            item = generation_item(row, tokenizer, cfg)
            if item is not None:
                generate.append(item)
    # which examples train something: a window of only target-free examples is skipped, not trained
    with_target = [has_target(labels) for labels in train["labels"]] if no_target else None
    if cfg.packing:
        train = PackedDataset(train, cfg.max_length)
        stats.update(packed_rows=len(train), packing_fill=round(train.fill, 4))
        with_target = train.row_has_target(with_target) if with_target else None
    return Data(train, evalset, generate, stats, warnings, with_target)


def load_run_data(cfg, tokenizer, accelerator) -> Data:
    """The user's data, or the embedded synthetic tasks written to <output_dir>/data/ first. The main
    process tokenizes first; the others reuse its `datasets` cache."""
    train_path, eval_path = cfg.data.path, cfg.data.eval_path
    with accelerator.main_process_first():
        if train_path is None:
            from dtrain.tasks import write_synthetic_data

            d = cfg.data
            data_dir = Path(cfg.output_dir) / "data"
            if accelerator.is_main_process:
                write_synthetic_data(
                    data_dir,
                    d.synthetic_tasks,
                    d.synthetic_train_examples,
                    d.synthetic_eval_examples,
                    cfg.train.seed,
                )
            train_path, eval_path = str(data_dir / "train.jsonl"), str(data_dir / "eval.jsonl")
        return build_data(cfg.data, tokenizer, train_path, eval_path, cfg.train.seed, cfg.eval.num_generate)


def check_targets(examples: int, without: int, max_length: int) -> list[str]:
    """Refuse data that trains nothing; warn about examples that train nothing."""
    if without == examples:
        raise UserError(
            f"--data.max_length {max_length}: none of the {examples} train examples keeps a token to learn "
            "(no response, or a response that starts beyond max_length); raise --data.max_length or check "
            "that the data has responses"
        )
    if not without:
        return []
    return [
        f"dtrain: warning: {without} of {examples} train examples ({without / examples:.1%}) have no token to "
        f"learn after truncation to --data.max_length {max_length}; they are read but train nothing"
    ]


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


@dataclass
class Collator:
    """Right-pad to the longest row of the batch (not to max_length): padding is wasted compute."""

    pad_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        width = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_collator(cfg: DataConfig, pad_id: int, device_type: str, attn_implementation: str | None):
    """Packed rows or right-padded examples; widths a multiple of 8 on CUDA (tensor-core friendly)."""
    multiple = 8 if device_type == "cuda" else 1
    if cfg.packing:
        flash = (attn_implementation or "").startswith("flash")
        return PackedCollator(pad_id, pad_to_multiple_of=multiple, flash=flash)
    return Collator(pad_id, pad_to_multiple_of=multiple)


class DataOrder:
    """Global sample position p -> example perm(epoch = p // N)[p % N], one seeded permutation per epoch."""

    def __init__(self, num_examples: int, seed: int):
        self.n, self.seed = num_examples, seed
        self._perm_epoch, self._perm = -1, None

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm[offset]


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's micro-batches, from the endless `DataOrder` stream.

    Global micro-batch k covers positions [start + k*B*W, start + (k+1)*B*W); rank r takes its r-th
    slice of B. So the order depends only on (seed, position), never on how many processes read it.
    """

    def __init__(
        self, num_examples: int, batch_size: int, rank: int, world_size: int, seed: int, start: int = 0
    ):
        self.batch_size, self.rank, self.world = batch_size, rank, world_size
        self.order, self.start = DataOrder(num_examples, seed), start

    def __iter__(self):
        position = self.start + self.rank * self.batch_size
        while True:
            yield [self.order.index(position + i) for i in range(self.batch_size)]
            position += self.batch_size * self.world


def train_loader(
    dataset,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    start: int,
    collator,
    num_workers: int,
    pin: bool,
):
    sampler = GlobalBatchSampler(len(dataset), batch_size, rank, world_size, seed, start)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers, pin_memory=pin
    )


def rank_shard(items: list, rank: int, world_size: int) -> tuple[list, int]:
    """Rank r's slice items[r::W], padded so every rank has the same count (sharded models need every
    rank in every forward); returns (slice, number of real items). Padding repeats item 0."""
    per_rank = math.ceil(len(items) / world_size)
    mine = items[rank::world_size]
    real = len(mine)
    return mine + [items[0]] * (per_rank - real), real


def eval_batches(dataset, batch_size: int, rank: int, world_size: int, collator):
    """Eval micro-batches for this rank; padding rows have all labels masked, so they count zero tokens."""
    rows, real = rank_shard(list(range(len(dataset))), rank, world_size)
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        batch = [dataset[i] for i in idx]
        for j in range(len(batch)):
            if start + j >= real:
                batch[j] = {
                    "input_ids": batch[j]["input_ids"],
                    "labels": [IGNORE_INDEX] * len(batch[j]["labels"]),
                }
        yield collator(batch)

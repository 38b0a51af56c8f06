"""Data: load a dataset, render a template, tokenize with prompt masking, batch without waste.

The train order is a pure function of (seed, samples consumed): an endless stream of seeded
per-epoch permutations, cut into global batches, each rank taking its slice. The data position
is therefore one integer (`samples_seen`) that survives a restart and a change of world size,
and nothing already consumed is re-read on resume.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dtrain.config import DataConfig, UserError, looks_local

IGNORE_INDEX = -100  # label value that never counts in the loss

# Alpaca layout without the long preamble (it would triple the sequence length of short tasks).
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_table(path: str, split: str, flag: str):
    """A `datasets.Dataset` from a local file, a saved dataset directory or a hub dataset name."""
    import datasets

    p = Path(path).expanduser()
    try:
        if p.is_file():
            builder = _FILE_BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise UserError(
                    f"--{flag}: unsupported file type '{p.suffix}' ({path}); use .json, .jsonl, .csv or .parquet"
                )
            if p.stat().st_size == 0 or (p.stat().st_size < 4096 and not p.read_bytes().strip()):
                raise UserError(f"--{flag}: '{path}' has no rows; point it at a non-empty dataset")
            ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        elif p.is_dir() and any(
            (p / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")
        ):
            ds = datasets.load_from_disk(str(p))
        elif p.is_dir():
            ds = datasets.load_dataset(str(p), split=split)
        elif looks_local(path):
            raise UserError(f"--{flag}: file '{path}' does not exist")
        else:
            ds = datasets.load_dataset(path, split=split)
    except UserError:
        raise
    except Exception as exc:  # parse errors, an unreachable hub, a missing split
        if _has_no_rows(p):
            raise UserError(f"--{flag}: '{path}' has no rows; point it at a non-empty dataset") from None
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise UserError(f"--{flag}: could not load '{path}': {reason}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(
                f"--{flag}: '{path}' has no split '{split}' (has: {', '.join(ds)}); set --data.split"
            )
        ds = ds[split]
    if len(ds) == 0:
        raise UserError(f"--{flag}: '{path}' has no rows; point it at a non-empty dataset")
    return ds


def _has_no_rows(p: Path) -> bool:
    """After `datasets` failed to load a local source: was it because it holds zero rows?
    (`datasets` reports that in internal words: "corresponds to no data", an index error...)"""
    try:
        if p.is_dir():  # save_to_disk of 0 rows writes no data file
            state = json.loads((p / "state.json").read_text()) if (p / "state.json").exists() else {}
            return state.get("_data_files") == []
        suffix = p.suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(p).num_rows == 0
        if suffix == ".csv":
            with open(p) as fh:
                return sum(1 for line in fh if line.strip()) <= 1  # a header alone
        if suffix in (".json", ".jsonl"):
            head = p.read_text()[:4096].strip() if p.stat().st_size < 4096 else "x"
            return head in ("", "[]", "{}")
    except Exception:
        return False
    return False


def required_columns(cfg: DataConfig) -> list[str]:
    return {
        "alpaca": ["instruction", "output"],
        "chat": [cfg.messages_column],
        "text": [cfg.text_column],
    }[cfg.template]


def check_columns(ds, cfg: DataConfig, path: str, flag: str) -> None:
    missing = [c for c in required_columns(cfg) if c not in ds.column_names]
    if missing:
        raise UserError(
            f"--{flag}: '{path}' lacks column(s) {', '.join(map(repr, missing))} needed by --data.template "
            f"{cfg.template} (it has: {', '.join(ds.column_names)}); pick the matching --data.template or rename the columns"
        )


# --------------------------------------------------------------------------------------------
# Templates -> (input_ids, labels). Prompt tokens are masked with IGNORE_INDEX.
# --------------------------------------------------------------------------------------------


def alpaca_prompt(row: dict) -> str:
    if row.get("input") not in (None, ""):
        return ALPACA_PROMPT.format(instruction=row["instruction"], input=row["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])


def _chat_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character spans of assistant turns."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(upto):
            raise UserError(
                "the tokenizer's chat template does not render conversations prefix by prefix; "
                "use --data.template text or a standard chat template"
            )
        spans.append((start, len(upto)))
    return full, spans


def encode_batch(batch: dict[str, list], tokenizer, cfg: DataConfig) -> dict[str, list]:
    """Examples -> input_ids, labels, truncated flags (one tokenizer call per column, not per row).

    Responses end with EOS so the model learns to stop.
    """
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if cfg.template == "alpaca":
        prompts = tokenizer([alpaca_prompt(r) for r in rows], add_special_tokens=True)["input_ids"]
        answers = tokenizer([str(r["output"]) for r in rows], add_special_tokens=False)["input_ids"]
        pairs = [
            (p + a + eos, [IGNORE_INDEX] * len(p) + a + eos) for p, a in zip(prompts, answers, strict=True)
        ]
    elif cfg.template == "chat":
        pairs = [_encode_chat(r[cfg.messages_column], tokenizer) for r in rows]
    else:
        texts = tokenizer([str(r[cfg.text_column]) for r in rows], add_special_tokens=True)["input_ids"]
        pairs = [(t + eos, t + eos) for t in texts]
    n = cfg.max_length
    return {
        "input_ids": [ids[:n] for ids, _ in pairs],
        "labels": [labels[:n] for _, labels in pairs],
        "truncated": [len(ids) > n for ids, _ in pairs],
    }


def _encode_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    text, spans = _chat_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
        for tok, (start, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return enc["input_ids"], labels


def encode(row: dict, tokenizer, cfg: DataConfig) -> dict:
    """One example (see `encode_batch`)."""
    out = encode_batch({k: [v] for k, v in row.items()}, tokenizer, cfg)
    return {k: v[0] for k, v in out.items()}


def generation_item(row: dict, tokenizer, cfg: DataConfig) -> dict | None:
    """Prompt ids and reference answer for the exact-match metric (None for plain text)."""
    if cfg.template == "alpaca":
        prompt = tokenizer(alpaca_prompt(row), add_special_tokens=True)["input_ids"]
        reference = str(row["output"])
    elif cfg.template == "chat":
        messages = row[cfg.messages_column]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return None
        text = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        reference = messages[last]["content"]
    else:
        return None
    return {"prompt_ids": prompt[-cfg.max_length :], "reference": reference, "task": row.get("task") or "all"}


@dataclass
class Data:
    train: object  # datasets.Dataset with input_ids, labels
    eval: object | None
    generate: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def tokenize(ds, tokenizer, cfg: DataConfig, what: str):
    out = ds.map(
        lambda batch: encode_batch(batch, tokenizer, cfg),
        batched=True,
        remove_columns=ds.column_names,
        desc=f"tokenizing {what}",
    )
    truncated = int(sum(out["truncated"]))
    no_target = int(sum(1 for labels in out["labels"] if all(t == IGNORE_INDEX for t in labels[1:])))
    return out.remove_columns("truncated"), truncated, no_target


def build_data(
    cfg: DataConfig, tokenizer, train_path: str, eval_path: str | None, seed: int, num_generate: int
) -> Data:
    """Load, check, split and tokenize. Called on the main process first (datasets caches the result)."""
    raw = load_table(train_path, cfg.split, "data.path")
    check_columns(raw, cfg, train_path, "data.path")
    if eval_path:
        raw_eval = load_table(eval_path, cfg.split, "data.eval_path")
        check_columns(raw_eval, cfg, eval_path, "data.eval_path")
    elif len(raw) >= 2:
        parts = raw.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        raw, raw_eval = parts["train"], parts["test"]
    else:
        raw_eval = None
    train, trunc, no_target = tokenize(raw, tokenizer, cfg, "train")
    stats = {"train_examples": len(train), "train_truncated": trunc, "train_without_target": no_target}
    evalset = None
    generate: list[dict] = []
    if raw_eval is not None:
        evalset, etrunc, _ = tokenize(raw_eval, tokenizer, cfg, "eval")
        stats.update(eval_examples=len(evalset), eval_truncated=etrunc)
        for row in raw_eval.select(range(min(num_generate, len(raw_eval)))):
            item = generation_item(row, tokenizer, cfg)
            if item is not None:
                generate.append(item)
    return Data(train=train, eval=evalset, generate=generate, stats=stats)


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


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's micro-batches, from an endless stream of seeded per-epoch permutations.

    Global sample position p maps to example perm(epoch = p // N)[p % N]. Global micro-batch k
    covers positions [start + k*B*W, start + (k+1)*B*W); rank r takes its r-th slice of B. So
    the order depends only on (seed, position), never on how many processes read it.
    """

    def __init__(
        self, num_examples: int, batch_size: int, rank: int, world_size: int, seed: int, start: int = 0
    ):
        self.n, self.batch_size, self.rank, self.world = num_examples, batch_size, rank, world_size
        self.seed, self.start = seed, start
        self._perm_epoch, self._perm = -1, None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm[offset]

    def __iter__(self):
        position = self.start + self.rank * self.batch_size
        while True:
            yield [self._index(position + i) for i in range(self.batch_size)]
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

"""Collate: rows -> tensors. Right-padded examples (`Collator`), or packed rows (`PackedCollator`) with
attention kept inside each example, and the eval batches of each rank.

Padding-free attention: every packed example's `position_ids` restart at 0 and no attention mask is
passed. transformers (>= 4.53.1) then builds a block-diagonal causal mask from the position ids (sdpa,
eager) and flash attention takes its varlen path; with flash attention the collator also hands over the
cumulative sequence lengths, so no layer has to derive them (a host sync per layer). Two silent traps
break that isolation: a KV cache in training (`use_cache` left on), or any 2-D attention mask. The
forward in `modeling.forward_logits` never does either, and `check_isolation` proves it on the live model
before the first step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dtrain.config import DataConfig, UserError
from dtrain.data.templates import IGNORE_INDEX


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


@dataclass
class PackedCollator:
    """Packed rows -> input_ids, labels, position_ids (0.. per example), and `attention_mask` marking real
    tokens for the throughput counters only (the model never sees it). A row is right-padded to the
    longest row of the batch. The first label of every example is masked, so no example's first token is
    ever the target of the previous example's last token. `flash`: also the cumulative sequence lengths
    of the flattened batch (examples and each row's padding as sequences of their own) for varlen flash
    attention, computed here on the host so no layer needs a device sync to find them."""

    pad_id: int
    pad_to_multiple_of: int = 1
    flash: bool = False

    def __call__(self, rows: list[list[dict]]) -> dict:
        lengths = [[len(ex["input_ids"]) for ex in row] for row in rows]
        longest = max(sum(n) for n in lengths)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        segments: list[int] = []
        for r, row in enumerate(rows):
            at = 0
            for ex in row:
                n = len(ex["input_ids"])
                ids[r, at : at + n] = torch.as_tensor(ex["input_ids"])
                labels[r, at + 1 : at + n] = torch.as_tensor(ex["labels"][1:])
                positions[r, at : at + n] = torch.arange(n)
                segments.append(n)
                at += n
            mask[r, :at] = 1
            if at < width:  # the padding: positions 0.. of a sequence of its own, never a target
                positions[r, at:] = torch.arange(width - at)
                segments.append(width - at)
        batch: dict[str, torch.Tensor | int] = {
            "input_ids": ids,
            "labels": labels,
            "position_ids": positions,
            "attention_mask": mask,
        }
        if self.flash:
            cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(torch.as_tensor(segments, dtype=torch.int32), 0)
            batch.update(
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(segments), max_length_k=max(segments)
            )
        return batch


def probe_rows(examples, vocab_size: int, length: int = 12) -> list[list[dict]]:
    """Two packed rows [A, B] and [C, B]: the same example B after two different examples of equal length.
    With attention kept inside each example, B's logits are the same in both rows."""
    first = list(examples[0]["input_ids"])[:length]
    b = list(examples[min(1, len(examples) - 1)]["input_ids"])[:length]
    a = first + [first[-1]] * (length - len(first))
    c = [(t + 1) % vocab_size for t in a]  # differs from A at every position
    as_example = lambda ids: {"input_ids": ids, "labels": ids}  # noqa: E731
    return [[as_example(a), as_example(b)], [as_example(c), as_example(b)]]


@torch.no_grad()
def check_isolation(model, forward, collator: PackedCollator, rows: list[list[dict]], what: str) -> float:
    """Refuse packing when a packed example can see the one before it: B's logits must not depend on
    what precedes it in the row. Runs on every rank (sharded models need all ranks in a forward).
    Returns the largest difference found (0 up to rounding)."""
    batch = collator(rows)
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        logits = forward(model, batch).float()
    finally:
        model.train(was_training)
    start = len(rows[0][0]["input_ids"])
    end = start + len(rows[0][1]["input_ids"])
    b1, b2 = logits[0, start:end], logits[1, start:end]
    diff = (b1 - b2).abs().max().item()
    scale = max(b1.abs().max().item(), 1e-6)
    if diff > 1e-3 * scale:
        raise UserError(
            f"--data.packing true: packed examples attend to each other with {what} (a packed example's "
            f"logits change by {diff:.3g} with the example before it); use --model.attn_implementation sdpa "
            "or eager, or --data.packing false"
        )
    return diff

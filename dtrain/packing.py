"""Packing: tokenized examples laid end to end in rows of `max_length` tokens, attention kept inside each.

`--data.packing true` packs once, before training, by best-fit decreasing (longest example first, into the
fullest row it still fits), so the packed rows are a pure function of the tokenized data and the train
order over them stays a pure function of (seed, rows consumed): exact resume holds as without packing.

Padding-free attention: every packed example's `position_ids` restart at 0 and no attention mask is
passed. transformers (>= 4.53.1) then builds a block-diagonal causal mask from the position ids (sdpa,
eager) and flash attention takes its varlen path; with flash attention the collator also hands over the
cumulative sequence lengths, so no layer has to derive them (a host sync per layer). Two silent traps
break that isolation: a KV cache in training (`use_cache` left on), or any 2-D attention mask. The
forward in `modeling.forward_logits` never does either, and `check_isolation` proves it on the live model
before the first step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dtrain.config import UserError
from dtrain.templates import IGNORE_INDEX


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, each holding at most `capacity` tokens. Longest examples first, each into
    the bin with the least room that still fits it, else a new bin.

    A segment tree over the room left (0..capacity) finds that bin in O(log capacity), so the lengths of
    a million examples pack in seconds. Deterministic: the same lengths always give the same bins."""
    size = 1 << max(capacity, 1).bit_length()  # leaves 0..size-1 cover every room 0..capacity
    count = [0] * (2 * size)  # count[node]: open bins whose room falls in the node's range
    by_room: list[list[int]] = [[] for _ in range(size)]  # room -> open bins with exactly that room

    def add(room: int, delta: int) -> None:
        node = room + size
        while node:
            count[node] += delta
            node //= 2

    def tightest(need: int) -> int | None:
        """The smallest room >= need that an open bin has (leftmost non-empty leaf at or after need)."""
        node, lo, hi = 1, 0, size - 1
        stack = [(node, lo, hi)]
        while stack:
            node, lo, hi = stack.pop()
            if hi < need or not count[node]:
                continue
            if lo == hi:
                return lo
            mid = (lo + hi) // 2
            stack += [(2 * node + 1, mid + 1, hi), (2 * node, lo, mid)]  # left child popped first
        return None

    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the row capacity {capacity}")
        room = tightest(n)
        if room is None:
            b, room = len(bins), capacity
            bins.append([])
        else:
            b = by_room[room].pop()
            add(room, -1)
        bins[b].append(i)
        if room - n > 0:
            by_room[room - n].append(b)
            add(room - n, 1)
    return bins


class PackedDataset(torch.utils.data.Dataset):
    """Rows of packed examples over a tokenized dataset; item = the row's examples, in packing order."""

    def __init__(self, examples, max_length: int):
        lengths = [len(ids) for ids in examples["input_ids"]]
        self.examples = examples
        self.bins = best_fit_decreasing(lengths, max_length)
        self.tokens = sum(lengths)
        self.fill = self.tokens / (len(self.bins) * max_length) if self.bins else 0.0

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, row: int) -> list[dict]:
        return [self.examples[i] for i in self.bins[row]]

    def row_has_target(self, with_target: list[bool]) -> list[bool]:
        return [any(with_target[i] for i in b) for b in self.bins]


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
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask}
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

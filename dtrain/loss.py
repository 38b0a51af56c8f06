"""The loss: next-token cross-entropy summed over target tokens, from one forward of the model.

Plain: the model's logits `[tokens, vocab]`, upcast to fp32, then the cross-entropy. With a large
vocabulary those logits dominate activation memory (a 128k vocabulary at 8k tokens is 4 GiB in fp32,
with as much again for their gradient). `--train.loss_chunk_size N` computes the output head and the
cross-entropy together, N tokens at a time, inside the head's own forward (so FSDP and ZeRO-3 have its
weight gathered), and recomputes each chunk in backward: the full logits never exist at once.
"""

from __future__ import annotations

import contextvars
import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dtrain.config import UserError
from dtrain.data.templates import IGNORE_INDEX

# What a packed batch hands the model besides input_ids (see packing.py); never an attention mask.
_PACKED_INPUTS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# The labels of the forward in progress, read by a chunked head (set by forward_loss_sum only).
_LABELS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("dtrain_labels", default=None)


def forward_logits(model, batch: dict) -> torch.Tensor:
    """One forward as training and eval use it. No cache (in training it would let packed examples
    attend to each other, and it is memory for nothing) and no attention mask: batches are right-padded,
    so under the causal mask no real token sees a pad, and a packed batch is isolated by its position
    ids. (No mask also skips transformers' is-there-padding check over the mask.)"""
    extra = {key: batch[key] for key in _PACKED_INPUTS if key in batch}
    return model(input_ids=batch["input_ids"], use_cache=False, **extra).logits


def forward_loss_sum(model, batch: dict) -> torch.Tensor:
    """The summed next-token loss of a batch: the plain way, or in chunks when the model's head was
    made a chunked head (`use_chunked_loss`), whose output is then the loss itself (a 0-d tensor)."""
    token = _LABELS.set(batch["labels"])
    try:
        out = forward_logits(model, batch)
    finally:
        _LABELS.reset(token)
    return out.reshape(()) if out.dim() <= 1 else token_loss_sum(out, batch["labels"])


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over target tokens (labels != -100), in fp32.

    A sum, not a mean: the caller divides by the number of target tokens of the whole
    accumulation window over all ranks, so every token weighs the same however the tokens fall
    into micro-batches and ranks.

    The labels are shifted, not the logits (as transformers' own loss does): `logits[:, :-1]` is not
    contiguous, so flattening it copied the whole [tokens, vocab] logits in forward, and its gradient
    (zeros of the full shape, then a copy into them) cost as much again in backward. The last position
    gets the target IGNORE_INDEX instead, which adds nothing to the sum.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(logits.device)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),  # .float(): a no-op on fp32 logits
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Target tokens in a batch as a device tensor (no host sync)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


# --------------------------------------------------------------------------------------------
# The chunked loss
# --------------------------------------------------------------------------------------------


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, weight, bias) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_loss_sum(
    hidden: torch.Tensor, labels: torch.Tensor, weight, bias, chunk_size: int
) -> torch.Tensor:
    """token_loss_sum(hidden @ weight.T + bias, labels), N positions at a time, each chunk recomputed in
    backward so that only one chunk's logits (and their gradient) are alive at once."""
    hidden = hidden[:, :-1].reshape(-1, hidden.size(-1))
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), chunk_size):  # a shape: no host sync
        part = slice(start, start + chunk_size)
        total = total + checkpoint(
            _chunk_loss, hidden[part], targets[part], weight, bias, use_reentrant=False
        )
    return total


def _chunked_head_forward(head: torch.nn.Linear, plain_forward, chunk_size: int, hidden: torch.Tensor):
    labels = _LABELS.get()
    if labels is None or hidden.size(1) != labels.size(1):  # generation, or a forward without labels
        return plain_forward(hidden)
    return chunked_loss_sum(hidden, labels, head.weight, head.bias, chunk_size)


def use_chunked_loss(model, chunk_size: int) -> None:
    """Make the model's output head compute the loss in chunks during training and eval forwards
    (generation still gets logits). Before `accelerator.prepare`: the sharding wrappers then gather the
    head's weight around this forward as around any other."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise UserError(
            f"--train.loss_chunk_size: the output head of {type(model).__name__} is a {type(head).__name__}, "
            "not a linear layer; set --train.loss_chunk_size 0"
        )
    # this head's forward, not the class's: mypy refuses any assignment to a method
    head.forward = functools.partial(_chunked_head_forward, head, head.forward, chunk_size)  # type: ignore[method-assign]


@torch.no_grad()
def check_chunked_loss(model, batch: dict) -> None:
    """The chunked loss must equal the plain one on this model: a model that transforms its logits after
    the head (soft-capping, a logit scale) would be trained on something else. Checked on one batch
    before the first step, on every rank (sharded models need all ranks in a forward)."""
    was_training = model.training
    model.eval()
    try:
        plain = token_loss_sum(forward_logits(model, batch), batch["labels"]).item()
        chunked = forward_loss_sum(model, batch).item()
    finally:
        model.train(was_training)
    if abs(chunked - plain) > 1e-4 * max(abs(plain), 1e-6):
        raise UserError(
            f"--train.loss_chunk_size: the chunked loss of this model ({chunked:.6g}) differs from its plain "
            f"loss ({plain:.6g}); the model changes its logits after the output head (soft-capping or "
            "scaling): set --train.loss_chunk_size 0"
        )

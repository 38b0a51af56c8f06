"""Loss normalisation: every target token weighs the same however tokens fall into micro-batches.

Runs the real `train_step` in-process (one CPU process) with an optimizer that records the
gradients it is asked to apply.
"""

from __future__ import annotations

import pytest
import torch
from conftest import fresh_accelerator, tiny_llama

from dtrain.config import UserError
from dtrain.data import IGNORE_INDEX, Collator
from dtrain.guards import NonfiniteGuard
from dtrain.loss import check_chunked_loss, forward_loss_sum, token_loss_sum, use_chunked_loss
from dtrain.tasks import build_char_tokenizer
from dtrain.train import train_step


class GradCapture(torch.optim.Optimizer):
    """Records the gradients at step() and changes nothing."""

    def __init__(self, params):
        super().__init__(params, {})
        self.captured: list[torch.Tensor] | None = None

    def step(self, closure=None):
        self.captured = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


def _examples(tokenizer, n: int = 8) -> list[dict]:
    """Uneven lengths and uneven target counts, so a mean of per-batch means would differ."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        length = 6 + 5 * i  # 6 .. 41 tokens
        ids = torch.randint(4, len(tokenizer), (length,), generator=g).tolist()
        prompt = 2 + (i * 3) % 7
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def _grads(micro_batch: int, accumulation: int) -> tuple[list[torch.Tensor], float]:
    accelerator = fresh_accelerator(accumulation)
    tok = build_char_tokenizer()
    model = tiny_llama(tok)
    opt = GradCapture(model.parameters())
    model, opt = accelerator.prepare(model, opt)
    collate = Collator(tok.pad_token_id)
    rows = _examples(tok)
    window = [collate(rows[i : i + micro_batch]) for i in range(0, len(rows), micro_batch)]
    assert len(window) == accumulation
    step = train_step(accelerator, model, opt, window, 0.0, NonfiniteGuard(accelerator))
    return opt.optimizer.captured, float(step.loss_sum / step.targets)


def test_four_micro_batches_of_two_equal_one_batch_of_eight():
    split, split_loss = _grads(micro_batch=2, accumulation=4)
    whole, whole_loss = _grads(micro_batch=8, accumulation=1)
    assert abs(split_loss - whole_loss) < 1e-5
    assert len(split) == len(whole)
    worst = max((a - b).abs().max().item() for a, b in zip(split, whole, strict=True))
    assert worst < 1e-5, f"largest gradient difference {worst}"
    # and the gradients are not trivially zero
    assert max(g.abs().max().item() for g in whole) > 1e-3


def test_mean_of_means_would_differ():
    """Guard that the fixture really has uneven token counts: the naive scheme gives another loss."""
    tok = build_char_tokenizer()
    collate = Collator(tok.pad_token_id)
    model = tiny_llama(tok)
    rows = _examples(tok)
    with torch.no_grad():
        means, total, count = [], 0.0, 0
        for i in range(0, 8, 2):
            b = collate(rows[i : i + 2])
            s = token_loss_sum(
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]
            )
            n = (b["labels"][:, 1:] != IGNORE_INDEX).sum()
            means.append((s / n).item())
            total, count = total + s.item(), count + n.item()
    assert abs(sum(means) / len(means) - total / count) > 1e-4


def test_padding_never_counts():
    tok = build_char_tokenizer()
    model = tiny_llama(tok, num_layers=1)
    row = _examples(tok, 1)[0]
    alone = Collator(tok.pad_token_id)([row])
    padded = Collator(tok.pad_token_id, pad_to_multiple_of=64)([row])
    assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1]
    with torch.no_grad():
        a = token_loss_sum(
            model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits,
            alone["labels"],
        )
        b = token_loss_sum(
            model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits,
            padded["labels"],
        )
    assert abs(a.item() - b.item()) < 1e-4


# --------------------------------------------------------------------------------------------
# The chunked loss (--train.loss_chunk_size)
# --------------------------------------------------------------------------------------------


def _llama(tok, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_loss_and_gradients_equal_the_plain_ones(tied, chunk):
    tok = build_char_tokenizer()
    batch = Collator(tok.pad_token_id)(_examples(tok))
    plain_model, chunked_model = _llama(tok, tied), _llama(tok, tied)
    use_chunked_loss(chunked_model, chunk)
    plain = forward_loss_sum(plain_model, batch)
    chunked = forward_loss_sum(chunked_model, batch)
    assert chunked.dim() == 0
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    plain.backward()
    chunked.backward()
    for (name, a), b in zip(plain_model.named_parameters(), chunked_model.parameters(), strict=True):
        # summed in another order: equal up to float rounding, relative to the tensor's largest entry
        assert (b.grad - a.grad).abs().max() <= 1e-6 * a.grad.abs().max(), name
    # generation and any forward without labels still get logits
    logits = chunked_model(input_ids=batch["input_ids"]).logits
    assert logits.shape == (*batch["input_ids"].shape, chunked_model.config.vocab_size)


def test_a_model_that_changes_its_logits_after_the_head_is_refused():
    """Gemma 2 soft-caps its logits after the head: chunking inside the head would skip that."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=2.0,
    )
    model = Gemma2ForCausalLM(config)
    use_chunked_loss(model, 8)
    batch = Collator(tok.pad_token_id)(_examples(tok, 2))
    with pytest.raises(UserError, match=r"--train.loss_chunk_size: the chunked loss of this model"):
        check_chunked_loss(model, batch)
    llama = _llama(tok, tied=True)
    use_chunked_loss(llama, 8)
    check_chunked_loss(llama, batch)  # passes where the head's output is the logits

"""Check 4, packing on CUDA with flash attention (when flash_attn imports; sdpa otherwise): a packed batch
gives its examples' logits, loss and gradients one by one, within bf16 rounding (flash's varlen path, fed the
packed collator's cu_seq_lens); a packed training step makes no host sync per layer, counted by CUDA itself
(torch.cuda.set_sync_debug_mode) as well as tests/test_host_sync.py counts them on CPU; and a packed run
trains through the real script. The CPU suite proves the same in fp32 with sdpa and eager only."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from conftest import assert_ok, bpe_tokenizer, tiny_config, train_rows
from test_host_sync import assert_only_verdict_and_detection, count_host_copies
from test_packing import _examples

from dtrain.config import DataConfig, EvalConfig, ModelConfig, OptimConfig
from dtrain.data import IGNORE_INDEX, Collator
from dtrain.data.collate import PackedCollator
from dtrain.guards import NonfiniteGuard
from dtrain.loss import forward_logits, token_loss_sum
from dtrain.modeling import build_model
from dtrain.optim import build_optimizer
from dtrain.tasks import build_char_tokenizer
from dtrain.train import train_step

from .common import attention, cuda_accelerator, finite_and_falling, losses, on_cuda, run_info, uses

pytestmark = pytest.mark.gpu
TEXTS = ["the cat sat on the mat", "a dog", "packing keeps examples apart", "hi", "one more example here"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def test_a_packed_batch_equals_its_examples_one_by_one_in_bf16(figure):
    """Packed logits, loss per target token and gradients equal the examples' one by one (bf16 autocast)."""
    from transformers import AutoModelForCausalLM

    attn = attention()
    tok = bpe_tokenizer(TEXTS * 20, pad=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", tok), attn_implementation=attn).cuda()
    model.train()
    examples = _examples(tok)
    packed = on_cuda(
        PackedCollator(tok.pad_token_id, flash=attn.startswith("flash"))([examples[:3], examples[3:]])
    )
    assert ("cu_seq_lens_q" in packed) == attn.startswith("flash")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = forward_logits(model, packed)
        loss = token_loss_sum(logits, packed["labels"])
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    singles, total, worst_logit = Collator(tok.pad_token_id), torch.zeros((), device="cuda"), 0.0
    lengths = [len(ex["input_ids"]) for ex in examples]
    starts = [(0, 0), (0, lengths[0]), (0, lengths[0] + lengths[1]), (1, 0), (1, lengths[3])]
    for ex, (row, at) in zip(examples, starts, strict=True):
        one = on_cuda(singles([ex]))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            alone = forward_logits(model, one)
            total = total + token_loss_sum(alone, one["labels"])
        n = len(ex["input_ids"])
        torch.testing.assert_close(logits[row, at : at + n].float(), alone[0].float(), rtol=2e-2, atol=2e-2)
        worst_logit = max(
            worst_logit, (logits[row, at : at + n].float() - alone[0].float()).abs().max().item()
        )
    total.backward()
    loss_rel = abs(loss.item() - total.item()) / total.item()
    grad_rel = max(
        rel_err(packed_grads[n], p.grad) for n, p in model.named_parameters() if p.grad is not None
    )
    figure("attention", attn)
    figure("max |logit diff|", worst_logit)
    figure("loss rel diff", loss_rel)
    figure("worst grad rel err", grad_rel)
    assert loss_rel <= 1e-2, (loss.item(), total.item())
    assert grad_rel <= 3e-2


@contextlib.contextmanager
def cuda_syncs():
    """The synchronizing CUDA operations in the block, as CUDA's own debug mode reports them (a copy to the
    host, a stream or device synchronize, `.item()`, a data-dependent shape...)."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    found += [str(w.message) for w in caught if "synchronizing CUDA operation" in str(w.message)]


STEPS = 3


def packed_steps(num_layers: int) -> tuple[list[str], list[str], int]:
    """(python-level host copies, CUDA syncs, forwards) of STEPS packed train_step calls, bf16, after one
    warm-up step, on a model of `num_layers` decoder layers."""
    acc = cuda_accelerator("bf16")
    tok = build_char_tokenizer()
    attn = attention()
    torch.manual_seed(0)
    shape = ModelConfig(
        hidden_size=64, num_layers=num_layers, num_heads=2, intermediate_size=128, attn_implementation=attn
    )
    model = build_model(shape, tok, DataConfig(), EvalConfig())
    optimizer = build_optimizer(model, OptimConfig(), acc.device)  # fused AdamW on CUDA
    model, optimizer = acc.prepare(model, optimizer)
    rows = [
        {"input_ids": list(range(4, 4 + n)), "labels": [IGNORE_INDEX] * 3 + list(range(7, 4 + n))}
        for n in (8, 12, 9, 15)
    ]
    pack = PackedCollator(tok.pad_token_id, pad_to_multiple_of=8, flash=attn.startswith("flash"))
    window = [pack([rows[:2], rows[2:3]]), pack([rows[3:]])]
    guard = NonfiniteGuard(acc)
    train_step(acc, model, optimizer, window, 1.0, guard)  # warm-up: cuBLAS handles, lazy initialisation
    torch.cuda.synchronize()
    with count_host_copies() as calls, cuda_syncs() as syncs:
        for _ in range(STEPS):
            train_step(acc, model, optimizer, window, 1.0, guard)
    return calls, syncs, STEPS * len(window)


def test_a_packed_step_makes_no_host_sync_per_layer_on_cuda(figure):
    """A packed bf16 step on CUDA: dtrain's one host read per step (the non-finite verdict) and
    transformers' one per forward, the same count at 1 and 4 layers: no per-layer sync."""
    one_calls, one_syncs, forwards = packed_steps(1)
    four_calls, four_syncs, _ = packed_steps(4)
    figure("attention", attention())
    figure("CUDA syncs / step", len(four_syncs) / STEPS)
    for calls in (one_calls, four_calls):
        assert_only_verdict_and_detection(calls, steps=STEPS, forwards=forwards)
    assert len(four_syncs) == len(one_syncs), (one_syncs, four_syncs)  # nothing scales with depth
    assert STEPS <= len(four_syncs) <= STEPS * (1 + 2 * forwards // STEPS), four_syncs


@uses("packed")
def test_a_packed_run_trains_on_the_gpu(runs, figure):
    """The script with --data.packing true and that attention on the GPU: the isolation check before the
    first step passes, rows are full, the loss falls."""
    run = runs["packed"]
    assert_ok(run.proc)
    info = run_info(run.out)
    assert info["config"]["model.attn_implementation"] == attention()
    assert info["config"]["data.packing"] is True and info["distributed"]["device"].startswith("cuda")
    rows = train_rows(run.out)
    padding = sum(r["padding_fraction"] for r in rows) / len(rows)
    got = losses(run.out)
    figure("attention", attention())
    figure("padding", padding)
    figure("packing fill", info["data"]["packing_fill"])
    assert finite_and_falling(got), got
    assert padding < 0.25  # unpacked, this data pads about 40%

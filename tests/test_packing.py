"""Packing (dtrain.data.collate): best-fit decreasing fills rows at least as well as the textbook algorithm;
a packed batch gives the same logits, loss per target token and gradients as its examples one by one
(sdpa and eager, Llama and Qwen2); the isolation guard catches the two silent traps; a packed run killed
with SIGKILL resumes with bitwise-equal losses."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import (
    TINY,
    assert_ok,
    bpe_tokenizer,
    dtrain_launch,
    kill_after_checkpoints,
    run_train,
    save_pretrained_dir,
    tiny_config,
    train_rows,
)

from dtrain.config import UserError
from dtrain.data import IGNORE_INDEX, Collator
from dtrain.data.collate import PackedCollator, check_isolation, probe_rows
from dtrain.data.pack import best_fit_decreasing, rows_of
from dtrain.loss import forward_logits, token_loss_sum


def textbook_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing by linear scan: the reference the fast version must match."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: room[b])
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_fit_decreasing_places_everything_and_fills_like_the_textbook(seed):
    rng = random.Random(seed)
    lengths = [min(128, int(rng.paretovariate(1.3) * 8)) for _ in range(600)]  # long-tailed, a few at 128
    bins = rows_of(*best_fit_decreasing(lengths, 128))
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each example exactly once
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) == len(textbook_bfd(lengths, 128))
    assert rows_of(*best_fit_decreasing(lengths, 128)) == bins  # deterministic
    assert sum(lengths) / (len(bins) * 128) > 0.95


def test_collator_restarts_positions_and_masks_each_first_label():
    rows = [
        [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}],
        [{"input_ids": [10, 11], "labels": [IGNORE_INDEX, 11]}],
    ]
    batch = PackedCollator(pad_id=0, flash=True)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # 8 (the second example's first token) is never the target of 7: its label is masked
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 11, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]
    # varlen flash: every example and each row's padding is a sequence of the flattened batch
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 10]
    assert batch["max_length_q"] == 3


def _examples(tok, n: int = 5) -> list[dict]:
    texts = ["the cat sat on the mat", "a dog", "packing keeps examples apart", "hi", "one more example here"]
    out = []
    for i, text in enumerate(texts[:n]):
        ids = tok(text)["input_ids"] + [tok.eos_token_id]
        labels = [IGNORE_INDEX] * (i % 3) + ids[i % 3 :]  # some with a masked prompt
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.fixture(scope="module")
def tok():
    texts = ["the cat sat on the mat", "a dog", "packing keeps examples apart", "hi", "one more example here"]
    return bpe_tokenizer(texts * 20, pad=True)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_equals_its_examples_one_by_one(tok, family, attn):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tok), attn_implementation=attn)
    model.train()  # the training forward (no dropout in these configs)
    examples = _examples(tok)
    packed = PackedCollator(tok.pad_token_id)([examples[:3], examples[3:]])

    logits = forward_logits(model, packed)
    loss = token_loss_sum(logits, packed["labels"])
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    singles = Collator(tok.pad_token_id)
    total = torch.zeros(())
    starts = [0, len(examples[0]["input_ids"]), len(examples[0]["input_ids"]) + len(examples[1]["input_ids"])]
    for k, ex in enumerate(examples):
        one = singles([ex])
        alone = forward_logits(model, one)
        row, at = (0, starts[k]) if k < 3 else (1, [0, len(examples[3]["input_ids"])][k - 3])
        n = len(ex["input_ids"])
        torch.testing.assert_close(logits[row, at : at + n], alone[0], rtol=1e-5, atol=1e-5)
        piece = token_loss_sum(alone, one["labels"])
        total = total + piece
    torch.testing.assert_close(loss, total, rtol=1e-5, atol=1e-5)  # so the loss per target token is equal
    total.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-5, atol=1e-5, msg=name)


def _broken_with_cache(model, batch):
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits


def _broken_with_mask(model, batch):
    ones = torch.ones_like(batch["input_ids"])  # an all-ones 2-D mask switches the packed detection off
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=ones).logits


def test_isolation_guard_passes_the_real_forward_and_catches_both_traps(tok):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", tok), attn_implementation="sdpa")
    model.config.use_cache = True  # the config default of most checkpoints: the trap is live
    examples = _examples(tok)
    rows = probe_rows(examples, len(tok))
    collator = PackedCollator(tok.pad_token_id)
    assert check_isolation(model, forward_logits, collator, rows, "sdpa") < 1e-5
    for broken in (_broken_with_cache, _broken_with_mask):
        with pytest.raises(UserError, match=r"--data.packing true: packed examples attend to each other"):
            check_isolation(model, broken, collator, rows, "sdpa")
    assert model.training  # the guard leaves the mode as it found it


# --------------------------------------------------------------------------------------------
# The real script: a packed run reports its fill, and resumes exactly after SIGKILL
# --------------------------------------------------------------------------------------------

STEPS = 120
PACKED = [
    *TINY,
    "--data.packing",
    "true",
    "--train.max_steps",
    str(STEPS),
    "--checkpoint.save_steps",
    "20",
    "--eval.steps",
    "0",
    "--eval.num_generate",
    "0",
    "--log.every_steps",
    "1",
    "--data.synthetic_train_examples",
    "2000",
]


@pytest.fixture(scope="module")
def straight_packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "run"
    proc = run_train([*PACKED, "--output_dir", str(out)])
    assert_ok(proc)
    return out, proc


def test_packed_run_reports_fill_and_trains(straight_packed):
    out, proc = straight_packed
    info = json.loads((out / "run_info.json").read_text())
    stats = info["data"]
    assert stats["packed_rows"] < stats["train_examples"] / 3  # short synthetic examples: many per row
    assert 0.9 < stats["packing_fill"] <= 1.0
    assert f"packed into {stats['packed_rows']:,} rows" in proc.stdout  # the start-up line
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.8
    # rows of 128 tokens, full to ~96%: little padding left (unpacked, this data pads ~40%)
    mean_padding = sum(r["padding_fraction"] for r in rows) / len(rows)
    assert mean_padding < 0.1


def test_packed_run_killed_resumes_with_bitwise_equal_losses(straight_packed, tmp_path):
    reference = {r["step"]: r["loss"] for r in train_rows(straight_packed[0])}
    out = tmp_path / "run"
    kill_after_checkpoints(PACKED, out)
    again = run_train([*PACKED, "--output_dir", str(out)])
    assert_ok(again)
    assert "resuming from" in again.stdout
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert {r["step"]: r["loss"] for r in rows} == reference  # bitwise


# --------------------------------------------------------------------------------------------
# A user's own model from a directory, packed, under the sharded profiles
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_dir_and_data(tmp_path_factory):
    """GPT-2 (learned absolute positions, tied head, no pad token) saved with save_pretrained, and alpaca
    rows of mixed lengths."""
    root = tmp_path_factory.mktemp("packed-gpt2")
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "ocean", "bread"]
    rows = []
    for i in range(48):
        n = 1 + int(rng.paretovariate(1.5))  # mostly one or two words, a few long ones
        text = " ".join(rng.choice(words) for _ in range(min(n, 12)))
        rows.append(
            {
                "instruction": "Repeat the words." if i % 2 else "Say them in capitals.",
                "input": text,
                "output": text if i % 2 else text.upper(),
            }
        )
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = bpe_tokenizer([r["instruction"] + r["input"] + r["output"] for r in rows], pad=False)
    return save_pretrained_dir(root / "gpt2", "gpt2", tok), data


@pytest.mark.slow
def test_packed_pretrained_gpt2_agrees_across_profiles(gpt2_dir_and_data, tmp_path):
    model, data = gpt2_dir_and_data
    args = [
        "--model.name_or_path",
        str(model),
        "--data.path",
        str(data),
        "--data.template",
        "alpaca",
        "--data.packing",
        "true",
        "--data.max_length",
        "256",
        "--train.max_steps",
        "4",
        "--checkpoint.save_steps",
        "0",
        "--eval.steps",
        "0",
        "--eval.num_generate",
        "0",
        "--log.every_steps",
        "1",
        "--log.progress_bar",
        "false",
        "--log.plots",  # the tests' recipes draw nothing (dtrain plot draws afterwards)
        "false",
    ]
    assert_ok(
        run_train([*args, "--train.per_device_batch_size", "4", "--output_dir", str(tmp_path / "single")])
    )
    reference = [r["loss"] for r in train_rows(tmp_path / "single")]
    stats = json.loads((tmp_path / "single" / "run_info.json").read_text())["data"]
    assert stats["packed_rows"] < stats["train_examples"] / 3
    for profile in ("fsdp", "zero3"):
        out = tmp_path / profile
        assert_ok(
            dtrain_launch(profile, [*args, "--train.per_device_batch_size", "2", "--output_dir", str(out)])
        )
        losses = [r["loss"] for r in train_rows(out)]
        assert losses == pytest.approx(reference, rel=1e-5), profile

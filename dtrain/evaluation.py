"""Eval: token-weighted loss over the eval set and exact match of greedy answers, across ranks.

Every rank runs the same number of forward passes (shards are padded), because sharded models
(FSDP, ZeRO-3) need all ranks in every forward.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dtrain.config import Config
from dtrain.data import Collator, Data, eval_batches, rank_shard
from dtrain.loss import count_targets, forward_loss_sum
from dtrain.tasks import exact_match


@torch.no_grad()
def eval_loss(accelerator, model, dataset, batch_size: int, collator: Collator) -> float | None:
    loss_sum, targets = eval_sums(accelerator, model, dataset, batch_size, collator)
    return loss_sum / targets if targets else None  # an eval set with nothing to score has no loss, not 0


@torch.no_grad()
def eval_sums(accelerator, model, dataset, batch_size: int, collator: Collator) -> tuple[float, float]:
    """(summed token loss, target tokens) over the eval set, over all ranks."""
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for batch in eval_batches(
        dataset, batch_size, accelerator.process_index, accelerator.num_processes, collator
    ):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        sums += torch.stack(
            [forward_loss_sum(model, batch).double(), count_targets(batch["labels"]).double()]
        )
    loss_sum, targets = accelerator.reduce(sums, reduction="sum").tolist()
    return loss_sum, targets


@torch.no_grad()
def generate_answers(
    accelerator, model, tokenizer, items: list[dict], batch_size: int, max_new_tokens: int
) -> tuple[dict, list[dict]]:
    """Greedy answers for `items` (prompt_ids, reference, task), split across ranks.

    Returns ({"exact_match": x, "exact_match/<task>": x, ...}, this rank's predictions).
    """
    if not items:
        return {}, []
    world, rank = accelerator.num_processes, accelerator.process_index
    tasks = sorted({it["task"] for it in items})
    mine, real = rank_shard(items, rank, world)
    unwrapped = accelerator.unwrap_model(model)
    pad = tokenizer.pad_token_id
    counts = torch.zeros(2 * len(tasks), dtype=torch.float64, device=accelerator.device)  # correct, total
    predictions = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        width = max(len(it["prompt_ids"]) for it in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, it in enumerate(chunk):  # left padding: every prompt ends where generation starts
            n = len(it["prompt_ids"])
            ids[i, width - n :] = torch.as_tensor(it["prompt_ids"])
            mask[i, width - n :] = 1
        out = unwrapped.generate(
            input_ids=ids.to(accelerator.device),
            attention_mask=mask.to(accelerator.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=world > 1,  # sharded weights: ranks keep stepping until all are done
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for j, (it, text) in enumerate(zip(chunk, texts, strict=True)):
            if start + j >= real:
                continue
            ok = exact_match(text, it["reference"])
            t = tasks.index(it["task"])
            counts[2 * t] += float(ok)
            counts[2 * t + 1] += 1.0
            predictions.append(
                {
                    "task": it["task"],
                    "prompt": tokenizer.decode(it["prompt_ids"], skip_special_tokens=True),
                    "prediction": text.strip(),
                    "reference": it["reference"],
                    "correct": ok,
                }
            )
    totals = accelerator.reduce(counts, reduction="sum").tolist()
    correct, total = sum(totals[0::2]), sum(totals[1::2])
    scores = {"exact_match": correct / total if total else math.nan}
    if len(tasks) > 1:
        for t, name in enumerate(tasks):
            scores[f"exact_match/{name}"] = totals[2 * t] / max(totals[2 * t + 1], 1.0)
    return scores, predictions


def run_eval(
    accelerator, model, tokenizer, data: Data, cfg: Config, collator: Collator, step: int
) -> tuple[dict, list[dict]]:
    """One eval row (eval_loss, eval_ppl, eval_exact_match...) and this rank's predictions. With several
    sources, eval_loss/<name> for each source with held-out data; eval_loss is over all their tokens."""
    model.eval()
    row: dict = {"step": step}
    batch_size = cfg.eval.batch_size or cfg.train.per_device_batch_size
    loss_sum = targets = 0.0
    for name, dataset in data.eval.items():
        s, t = eval_sums(accelerator, model, dataset, batch_size, collator)
        if t and len(data.names) > 1:
            row[f"eval_loss/{name}"] = s / t
        loss_sum, targets = loss_sum + s, targets + t
    if targets:  # an eval set with nothing to score has no loss, not 0
        loss = loss_sum / targets
        row["eval_loss"], row["eval_ppl"] = loss, math.exp(min(loss, 50.0))
    predictions: list[dict] = []
    if data.generate and cfg.eval.num_generate:
        scores, predictions = generate_answers(
            accelerator, model, tokenizer, data.generate, batch_size, cfg.eval.max_new_tokens
        )
        row.update({f"eval_{k}": v for k, v in scores.items()})
    model.train()
    return row, predictions


def track_best(state, row: dict, metric: str, patience: int) -> bool:
    """Update best/early-stopping state (a TrainState) from an eval row; True when training should stop."""
    value = row.get(f"eval_{metric}")
    if value is not None and math.isnan(value):
        value = None
    state.last_eval_step, state.last_eval_metric = row["step"], value
    if value is None:
        return False
    better = state.best_metric is None or (
        value < state.best_metric if metric == "loss" else value > state.best_metric
    )
    if better:
        state.best_metric, state.best_step, state.evals_without_improvement = value, row["step"], 0
    else:
        state.evals_without_improvement += 1
    row["best_" + metric] = state.best_metric
    return bool(patience) and state.evals_without_improvement >= patience


def report_samples(accelerator, out: Path, predictions: list[dict], n: int) -> None:
    """samples.jsonl and the printed samples: a few greedy answers next to their references."""
    if not accelerator.is_main_process or not predictions or not n:
        return
    with open(out / "samples.jsonl", "w") as fh:
        for p in predictions[:n]:
            fh.write(json.dumps(p) + "\n")
            mark = "ok " if p["correct"] else "bad"
            print(
                f"[{mark}] {p['prompt']!r} -> {p['prediction']!r} (expected {p['reference']!r})", flush=True
            )

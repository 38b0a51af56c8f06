"""dtrain.evaluation: eval loss over target tokens only, and best/early-stopping bookkeeping (in-process)."""

from __future__ import annotations

import datasets
import pytest
from conftest import fresh_accelerator, tiny_llama

from dtrain.checkpoint import TrainState
from dtrain.data import IGNORE_INDEX, Collator
from dtrain.evaluation import eval_loss, track_best
from dtrain.tasks import build_char_tokenizer


def test_eval_loss_is_absent_without_a_target_token_never_zero():
    accelerator = fresh_accelerator()
    tok = build_char_tokenizer()
    model = accelerator.prepare(tiny_llama(tok))
    ids = [[1, 10, 11, 12, 13], [1, 14, 15]]
    scored = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    unscored = datasets.Dataset.from_dict(
        {"input_ids": ids, "labels": [[IGNORE_INDEX] * len(i) for i in ids]}
    )
    collate = Collator(tok.pad_token_id)
    assert eval_loss(accelerator, model, scored, 2, collate) > 0
    assert eval_loss(accelerator, model, unscored, 2, collate) is None


@pytest.mark.parametrize(
    ("metric", "values", "best", "stops_at"),
    [
        ("loss", [3.0, 2.0, 2.5, 2.6], 2.0, 4),  # lower is better; patience 2 runs out at the 4th eval
        ("exact_match", [0.1, 0.5, 0.5, 0.4], 0.5, 4),  # higher is better; a tie is no improvement
    ],
)
def test_track_best_and_patience(metric, values, best, stops_at):
    state = TrainState()
    stops = [
        track_best(state, {"step": i, f"eval_{metric}": v}, metric, patience=2)
        for i, v in enumerate(values, 1)
    ]
    assert state.best_metric == best and state.best_step == 2
    assert stops.index(True) + 1 == stops_at


def test_track_best_ignores_an_eval_without_the_metric():
    state = TrainState(best_metric=1.0, best_step=3)
    assert track_best(state, {"step": 5}, "loss", patience=1) is False
    assert state.best_metric == 1.0 and state.evals_without_improvement == 0 and state.last_eval_step == 5

"""dtrain.data.cache: a run's own prepared cache in its output directory, one per set of data settings,
reused while it matches, dropped when stale, removed when the start fails. One process with a real
Accelerator (the multi-node wait is tested on Slurm in test_slurm.py, a failing main process on 2 ranks
in test_data_runs.py)."""

from __future__ import annotations

import json

import pytest
from conftest import fresh_accelerator

from dtrain.config import Config, DataConfig, UserError
from dtrain.data import load_run_data


def config(tmp_path, **data) -> Config:
    cfg = Config(output_dir=str(tmp_path / "run"))
    cfg.data = DataConfig(
        **{"path": str(tmp_path / "web.jsonl"), "template": "text", "max_length": 16, **data}
    )
    return cfg


@pytest.fixture
def corpus(tmp_path):
    docs = ["abc " * (1 + i % 9) for i in range(40)]
    (tmp_path / "web.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def test_the_cache_is_reused_while_it_matches_and_replaced_once_a_run_starts(tok, tmp_path, corpus):
    acc = fresh_accelerator()
    first = load_run_data(config(tmp_path), tok, acc)
    again = load_run_data(config(tmp_path), tok, acc)
    assert (first.stats["tokenize_cache"], again.stats["tokenize_cache"]) == ("miss", "hit")
    assert first.cache == again.cache and not again.created
    other = load_run_data(config(tmp_path, packing=True), tok, acc)  # other settings: a cache of its own
    assert other.created and other.cache != first.cache and first.cache.is_dir()
    with other.discarded_on_error(acc):
        pass  # the run started: the caches it no longer uses go
    assert not first.cache.exists() and other.cache.is_dir()


def test_a_start_that_fails_removes_the_cache_it_made_and_keeps_an_earlier_one(tok, tmp_path, corpus):
    acc = fresh_accelerator()
    earlier = load_run_data(config(tmp_path), tok, acc)
    data = load_run_data(config(tmp_path, max_length=24), tok, acc)
    with pytest.raises(UserError), data.discarded_on_error(acc):
        raise UserError("a bad model, found after the data was prepared")
    assert not data.cache.exists() and earlier.cache.is_dir()
    reused = load_run_data(config(tmp_path), tok, acc)
    with pytest.raises(UserError), reused.discarded_on_error(acc):
        raise UserError("the same failure on a cache this start did not make")
    assert reused.cache.is_dir()  # not this start's to remove

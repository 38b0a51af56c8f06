"""dtrain.data.prepare (and the data package's one call): sources tokenized once into memory-mapped token
arrays with a manifest; long text documents split so that one epoch trains every token exactly once; the
eval split by document; a manifest that does not match the run refused in one line. In process, no
training (the runs on prepared data are in test_data_runs.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dtrain.config import Config, DataConfig, SourceConfig, UserError, resolved_sources
from dtrain.data import IGNORE_INDEX, Collator, GlobalBatchSampler, PackedCollator, assemble
from dtrain.data.prepare import (
    MANIFEST,
    check_manifest,
    open_prepared,
    read_manifest,
    split_prepare_args,
    write_prepared,
)

MAX = 32


def corpus(path: Path, n: int = 60, seed: int = 0) -> list[str]:
    """Plain text documents from a few characters to 20x MAX tokens (the char tokenizer: one per char)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.choice([3, 10, 29, 30, 31, 45, 200, 20 * MAX]))
        docs.append("".join(rng.choice(list("abcdefgh"), length)) + f"{i % 10}")
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def qa(path: Path, n: int = 40) -> Path:
    rows = [
        {"instruction": "Reverse: " + "xyz"[: 1 + i % 3] * (1 + i % 5), "output": "ok" * (1 + i % 4)}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(**data) -> Config:
    cfg = Config()
    cfg.data = DataConfig(**{"max_length": MAX, **data})
    if cfg.data.sources:
        cfg.data.sources = [SourceConfig(**s) if isinstance(s, dict) else s for s in cfg.data.sources]
    return cfg


def prepare(cfg: Config, tok, out: Path):
    sources = resolved_sources(cfg.data)
    flags = [f"data.sources[{i}]." for i in range(len(sources))] if cfg.data.sources else ["data."]
    manifest = write_prepared(cfg, tok, sources, out, num_proc=1, flags=flags, say=lambda *_: None)
    return assemble(cfg, open_prepared(out, read_manifest(out), 16), sources), manifest


def bigrams(ids) -> Counter:
    return Counter(zip(ids[:-1], ids[1:], strict=True))


def trained_bigrams(batch: dict) -> Counter:
    """(token before, target) for every target a batch trains (position 0 is never a target)."""
    ids, labels = batch["input_ids"], batch["labels"]
    out = Counter()
    for r in range(ids.shape[0]):
        for j in range(1, ids.shape[1]):
            if labels[r, j] != IGNORE_INDEX:
                assert labels[r, j] == ids[r, j]
                out[(int(ids[r, j - 1]), int(labels[r, j]))] += 1
    return out


@pytest.mark.parametrize("packing", [False, True])
def test_one_epoch_trains_every_token_of_every_train_document_exactly_once(tok, tmp_path, packing):
    """Documents up to 20x max_length: walk the sampler and the collator over one epoch; every token of
    every train document but its first is a target exactly once (as a bigram with the token before it,
    so a target lost or doubled at a piece boundary shows), and no eval document is trained on."""
    docs = corpus(tmp_path / "web.jsonl")
    cfg = config(path=str(tmp_path / "web.jsonl"), template="text", packing=packing, eval_fraction=0.1)
    data, _ = prepare(cfg, tok, tmp_path / "prep")
    encoded = [tok(d)["input_ids"] + [tok.eos_token_id] for d in docs]
    evalset = data.eval["web"]
    eval_docs = []
    current: list[int] = []
    for i in range(evalset.num_examples):  # the eval pieces, joined back into whole documents
        piece = evalset.example(i)["input_ids"].tolist()
        current = current + piece[1:] if current and current[-1] != tok.eos_token_id else piece
        if current[-1] == tok.eos_token_id:
            eval_docs.append(current)
            current = []
    assert len(eval_docs) == data.stats["eval_documents"] == 6  # 10% of the documents, whole
    assert all(d in encoded for d in eval_docs)  # held out by document, before any was split
    train_docs = [d for d in encoded if d not in eval_docs]
    expected = sum((bigrams(d) for d in train_docs), Counter())

    rows = len(data.train)
    collator = PackedCollator(tok.pad_token_id) if packing else Collator(tok.pad_token_id)
    sampler = iter(GlobalBatchSampler(data.order, 4, 0, 1))
    seen, got = [], Counter()
    for _ in range(-(-rows // 4)):
        batch_rows = next(sampler)
        seen += batch_rows
        got += trained_bigrams(collator([data.train[r] for r in batch_rows]))
    extra = seen[rows:]  # the last batch runs into the next epoch: take those rows back out
    for r in extra:
        got -= trained_bigrams(collator([data.train[r]]))
    assert sorted(seen[:rows]) == list(range(rows))
    assert got == expected
    assert sum(got.values()) == sum(len(d) - 1 for d in train_docs)
    assert data.stats["train_truncated"] == 0 and data.stats["longest_example"] == MAX


def test_prepared_arrays_are_memory_mapped_with_no_list_per_example(tok, tmp_path):
    corpus(tmp_path / "web.jsonl")
    cfg = config(
        sources=[
            {"path": str(tmp_path / "web.jsonl"), "template": "text"},
            {"path": str(qa(tmp_path / "qa.jsonl")), "template": "alpaca"},
        ],
        packing=True,
    )
    data, manifest = prepare(cfg, tok, tmp_path / "prep")
    for split in data.train.splits:
        for name in ("tokens", "offsets", "has_target", "row_offsets", "row_items", "row_tokens"):
            array = getattr(split, name)
            assert isinstance(array, np.memmap), name  # mapped from disk, not read into the process
        assert split.tokens.dtype == np.uint16  # a 104-token vocabulary: two bytes a token
    assert data.train.splits[0].targets is None  # text: every token trains, no per-token mask stored
    assert data.train.splits[1].targets.dtype == np.uint8
    assert isinstance(data.order.indices(0, 8), np.ndarray)
    assert manifest["sources_data"]["qa"]["train"]["examples"] == len(data.train.splits[1].has_target)
    assert not list(tmp_path.glob(".prep.tmp-*"))  # written under a temporary name, renamed when done


def test_alpaca_keeps_truncating_and_counts_it(tok, tmp_path):
    rows = [{"instruction": "Copy.", "input": "x" * n, "output": "y" * n} for n in (1, 5, 40, 60, 2, 3)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    cfg = config(
        path=str(tmp_path / "train.jsonl"),
        eval_path=str(tmp_path / "eval.jsonl"),
        template="alpaca",
        max_length=64,
    )
    data, _ = prepare(cfg, tok, tmp_path / "prep")
    assert data.stats["train_examples"] == data.stats["train_documents"] == 6  # never split, never dropped
    assert data.stats["train_truncated"] == 2 and data.stats["eval_truncated"] == 1
    assert all(len(data.train[i]["input_ids"]) <= 64 for i in range(6))
    assert [g["reference"] for g in data.generate] == ["y", "yyyyy", "y" * 40]


def test_a_mixture_weights_tokens_and_names_every_source(tok, tmp_path):
    corpus(tmp_path / "web.jsonl", n=80)
    cfg = config(
        sources=[
            {"path": str(tmp_path / "web.jsonl"), "template": "text", "weight": 3},
            {"path": str(qa(tmp_path / "qa.jsonl")), "template": "alpaca", "name": "sft"},
        ],
        packing=True,
    )
    data, _ = prepare(cfg, tok, tmp_path / "prep")
    assert data.names == ["web", "sft"] and set(data.eval) == {"web", "sft"}
    info = data.stats["sources"]
    assert info["web"]["target_share"] == 0.75 and info["sft"]["target_share"] == 0.25
    window = data.window(0, 2000)  # many epochs of the small source: the token shares follow the weights
    shares = window.tokens / window.tokens.sum()
    assert abs(shares[0] - 0.75) < 0.02
    assert window.rows.sum() == 2000
    assert "sft 25.0% of tokens" in data.mix(2000)
    assert data.generate and all(g["task"].startswith("sft") for g in data.generate)


# --------------------------------------------------------------------------------------------
# A prepared directory that is not this run's data: one line naming what differs
# --------------------------------------------------------------------------------------------


@pytest.fixture
def prepared_web(tok, tmp_path):
    corpus(tmp_path / "web.jsonl")
    cfg = config(path=str(tmp_path / "web.jsonl"), template="text")
    prepare(cfg, tok, tmp_path / "prep")
    return cfg, tmp_path / "prep"


def refusal(cfg: Config, tok, path: Path) -> str:
    with pytest.raises(UserError) as err:
        check_manifest(read_manifest(path), cfg, tok, resolved_sources(cfg.data), path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--data.prepared {path}")
    return message


def test_a_matching_manifest_is_accepted_and_a_recipe_without_sources_uses_its_own(prepared_web, tok):
    cfg, path = prepared_web
    check_manifest(read_manifest(path), cfg, tok, resolved_sources(cfg.data), path)
    check_manifest(read_manifest(path), config(template="text"), tok, [], path)


def test_another_tokenizer_is_refused(prepared_web):
    from conftest import bpe_tokenizer

    cfg, path = prepared_web
    assert "another tokenizer" in refusal(cfg, bpe_tokenizer(["abc def"] * 20, pad=True), path)


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("max_length", 64, "--data.max_length is 64 here, 32 there"),
        ("packing", True, "--data.packing is true here"),
    ],
)
def test_another_max_length_or_packing_is_refused(prepared_web, tok, key, value, words):
    cfg, path = prepared_web
    setattr(cfg.data, key, value)
    assert words in refusal(cfg, tok, path)


def test_a_source_changed_since_is_refused(prepared_web, tok):
    cfg, path = prepared_web
    source = Path(cfg.data.path)
    source.write_text(source.read_text() + json.dumps({"text": "one more document"}) + "\n")
    assert f"source 'web' (path {source.resolve()}) changed since it was prepared" in refusal(cfg, tok, path)


def test_other_sources_are_refused(prepared_web, tok, tmp_path):
    cfg, path = prepared_web
    other = config(
        sources=[{"path": cfg.data.path, "template": "text"}, {"path": str(qa(tmp_path / "qa.jsonl"))}]
    )
    assert "it holds sources web, this run has web, qa" in refusal(other, tok, path)


def test_a_half_written_directory_is_refused(prepared_web):
    _, path = prepared_web
    (path / MANIFEST).unlink()  # what a prepare killed before its rename leaves (under its temporary name)
    with pytest.raises(UserError, match="has no manifest.json: .* whose writing did not finish"):
        read_manifest(path)


def test_prepare_arguments_find_out_dir_among_training_flags():
    assert split_prepare_args(
        ["--config", "r.yaml", "out", "--num-proc", "4", "--data.max_length", "64"]
    ) == ("out", 4, ["--config", "r.yaml", "--data.max_length", "64"])
    assert split_prepare_args(["--data.packing=true", "out"]) == ("out", None, ["--data.packing=true"])
    with pytest.raises(UserError, match="--num-proc must be a whole number >= 1"):
        split_prepare_args(["out", "--num-proc", "0"])


def test_only_a_stream_that_reads_as_before_continues_an_old_data_format(tmp_path):
    from dtrain.data.prepare import FORMAT_VERSION, stream_change

    (tmp_path / "a.jsonl").write_text("{}\n")
    chat_with_eval = config(path=str(tmp_path / "a.jsonl"), eval_path=str(tmp_path / "a.jsonl"))
    assert stream_change(FORMAT_VERSION, config(path=str(tmp_path / "a.jsonl"), template="text")) is None
    assert stream_change(1, config()) is None  # the embedded data: the same rows in the same order
    assert stream_change(1, chat_with_eval) is None
    for cfg in (
        config(path=str(tmp_path / "a.jsonl"), template="text"),
        config(path=str(tmp_path / "a.jsonl")),
    ):
        assert "data format 1" in stream_change(1, cfg)  # text now split, or the eval split now fixed


def test_start_up_memory_is_arrays_not_python_objects_per_example(tok, tmp_path):
    """Open a prepared corpus and draw the first window at 1x and 10x the documents: what start-up holds
    (traced by tracemalloc) grows by a few bytes a row (int32 permutations), not by a Python object per
    example (a list of ints costs 36 bytes an item; the pre-package data path held three such lists)."""
    import tracemalloc

    peaks = {}
    for scale in (1, 10):
        path = tmp_path / f"docs-{scale}.jsonl"
        path.write_text("".join(json.dumps({"text": "ab" * (1 + i % 7)}) + "\n" for i in range(2000 * scale)))
        cfg = config(path=str(path), template="text", eval_fraction=0.01)
        sources = resolved_sources(cfg.data)
        write_prepared(cfg, tok, sources, tmp_path / f"prep-{scale}", 1, ["data."], say=lambda *_: None)
        out = tmp_path / f"prep-{scale}"
        tracemalloc.start()
        data = assemble(cfg, open_prepared(out, read_manifest(out), 16), sources)
        data.window(0, 64)
        for r in data.order.indices(0, 64).tolist():
            data.train[r]
        peaks[scale] = (tracemalloc.get_traced_memory()[1], len(data.train))
        tracemalloc.stop()
    (small, rows_small), (large, rows_large) = peaks[1], peaks[10]
    per_row = (large - small) / (rows_large - rows_small)
    assert per_row < 12, f"start-up holds {per_row:.1f} bytes per extra row"

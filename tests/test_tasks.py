"""dtrain.tasks: synthetic data generation, the exact-match metric, the embedded char tokenizer."""

from __future__ import annotations

import json
import random

import pytest

from dtrain.config import SYNTHETIC_TASKS
from dtrain.tasks import TASKS, build_char_tokenizer, exact_match, make_examples, write_synthetic_data

ALL_TASKS = ["reverse", "sort", "add", "upper", "copy"]
PRINTABLE = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
INSTRUCTIONS = {
    "reverse": "Reverse:",
    "sort": "Sort:",
    "add": "Add:",
    "upper": "Capitalize:",
    "copy": "Copy:",
}


def solve(task: str, text: str) -> str:
    """An independent solver for each task."""
    if task == "reverse":
        return "".join(reversed(text))
    if task == "sort":
        return "".join(sorted(text))
    if task == "add":
        a, b = text.split("+")
        return str(int(a) + int(b))
    if task == "upper":
        return text.upper()
    if task == "copy":
        return text
    raise AssertionError(task)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


# --------------------------------------------------------------------------------------------
# Synthetic examples
# --------------------------------------------------------------------------------------------


def test_task_registry_matches_config():
    assert set(TASKS) == set(SYNTHETIC_TASKS) == set(ALL_TASKS)


def test_make_examples_is_deterministic_per_seed():
    a = make_examples(ALL_TASKS, 200, 30, seed=1)
    b = make_examples(ALL_TASKS, 200, 30, seed=1)
    c = make_examples(ALL_TASKS, 200, 30, seed=2)
    assert a == b
    assert a[0] != c[0]
    assert a[1] != c[1]


def test_make_examples_sizes_and_round_robin():
    train, evals = make_examples(["reverse", "add", "copy"], 31, 7, seed=0)
    assert len(train) == 31 and len(evals) == 7
    assert [r["task"] for r in train[:6]] == ["reverse", "add", "copy"] * 2
    assert [r["task"] for r in evals] == ["reverse", "add", "copy", "reverse", "add", "copy", "reverse"]
    for row in train + evals:
        assert set(row) == {"task", "instruction", "input", "output", "messages"}
        assert row["messages"] == [
            {"role": "user", "content": f"{row['instruction']} {row['input']}"},
            {"role": "assistant", "content": row["output"]},
        ]


def test_eval_prompts_never_appear_in_train():
    train, evals = make_examples(ALL_TASKS, 3000, 300, seed=5)
    held_out = {(r["task"], r["input"]) for r in evals}
    assert len(held_out) == 300  # eval prompts are distinct
    assert not held_out & {(r["task"], r["input"]) for r in train}


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_every_answer_is_correct(seed):
    train, evals = make_examples(ALL_TASKS, 500, 100, seed=seed)
    for row in train + evals:
        assert row["instruction"] == INSTRUCTIONS[row["task"]]
        assert row["output"] == solve(row["task"], row["input"])
        if row["task"] == "add":
            a, b = row["input"].split("+")
            assert 10 <= int(a) <= 49 and 0 <= int(b) <= 9
        else:
            assert row["input"].isalpha() and row["input"].islower()
            assert len(row["input"]) == 4


def test_write_synthetic_data_is_atomic_and_reproducible(tmp_path):
    out = tmp_path / "data" / "nested"
    train_path, eval_path = write_synthetic_data(out, ["sort", "add"], 50, 10, seed=3)
    assert train_path == out / "train.jsonl" and eval_path == out / "eval.jsonl"
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "train.jsonl"]  # no temp files left
    first = (train_path.read_bytes(), eval_path.read_bytes())
    train_rows = [json.loads(line) for line in first[0].decode().splitlines()]
    eval_rows = [json.loads(line) for line in first[1].decode().splitlines()]
    assert (train_rows, eval_rows) == make_examples(["sort", "add"], 50, 10, seed=3)
    assert first[0].endswith(b"\n") and first[1].endswith(b"\n")

    write_synthetic_data(out, ["sort", "add"], 50, 10, seed=3)  # regenerated over the old files
    assert (train_path.read_bytes(), eval_path.read_bytes()) == first
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "train.jsonl"]

    write_synthetic_data(out, ["sort", "add"], 50, 10, seed=4)
    assert train_path.read_bytes() != first[0]


def test_written_data_loads_through_datasets(tmp_path):
    from dtrain.data import load_table

    train_path, _ = write_synthetic_data(tmp_path, ALL_TASKS, 25, 5, seed=0)
    ds = load_table(str(train_path), "train", "data.path")
    assert len(ds) == 25
    assert all(isinstance(x, str) for x in ds["output"])  # "add" answers stay strings, not ints


# --------------------------------------------------------------------------------------------
# Metric
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("abc", "abc", True),
        ("  abc\n", "abc", True),
        ("abc", "\tabc  ", True),
        ("abc", "abd", False),
        ("ABC", "abc", False),
        ("a bc", "abc", False),
        ("", "", True),
        ("", "x", False),
    ],
)
def test_exact_match_trims_whitespace_only(prediction, reference, expected):
    assert exact_match(prediction, reference) is expected


# --------------------------------------------------------------------------------------------
# Char tokenizer
# --------------------------------------------------------------------------------------------


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "  two  spaces  ", "a . b , c ! d ? e 's n't", "x\n\ty\n", "".join(PRINTABLE)]
    texts += ["".join(rng.choice(PRINTABLE) for _ in range(rng.randint(1, 60))) for _ in range(n)]
    # literal special-token strings are parsed as special tokens (standard HF behaviour); keep them out
    return [t for t in texts if not any(s in t for s in ("<s>", "</s>", "<pad>", "<unk>"))]


def test_char_tokenizer_round_trips_printable_ascii(tok):
    for text in random_texts(300, seed=0):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
        with_bos = tok(text)["input_ids"]
        assert with_bos == [tok.bos_token_id, *ids]
        assert tok.decode(with_bos, skip_special_tokens=True) == text


def test_char_tokenizer_special_tokens(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    assert len(ids) == 4
    assert len(tok) == 4 + 95 + 2 + 3  # specials, printable ASCII, \n \t, role markers
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_char_tokenizer_chat_template(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<s><|user|>hi\n<|assistant|>yo</s>"
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == 9  # role markers are single tokens
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|>hi\n<|assistant|>"
    assert text.startswith(prompt)


def test_char_tokenizer_save_and_reload(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(again) == len(tok)
    assert again.get_vocab() == tok.get_vocab()
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(again, attr) == getattr(tok, attr), attr
    assert again.chat_template == tok.chat_template
    for text in random_texts(100, seed=1):
        assert again(text)["input_ids"] == tok(text)["input_ids"]
        ids = again(text, add_special_tokens=False)["input_ids"]
        assert again.decode(ids, skip_special_tokens=True) == text
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert again.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(
        messages, tokenize=False
    )

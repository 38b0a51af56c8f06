"""dtrain.data.templates: alpaca, chat and text with prompt masking, and truncation that keeps the response."""

from __future__ import annotations

import re

import pytest
from conftest import CONVERSATION, trained

from dtrain.config import DataConfig
from dtrain.data.templates import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    alpaca_prompt,
    encode,
    encode_batch,
    generation_item,
    split_pieces,
)

ROWS = [{"instruction": "Reverse the letters.", "input": "abc", "output": "cba"}]


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------


def test_alpaca_masks_exactly_the_prompt(tok):
    row = ROWS[0]
    enc = encode(row, tok, DataConfig(template="alpaca"))
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    assert enc["truncated"] is False
    prompt_ids = tok(alpaca_prompt(row), add_special_tokens=True)["input_ids"]
    n = len(prompt_ids)
    assert ids[:n] == prompt_ids
    assert labels[:n] == [IGNORE_INDEX] * n  # every prompt token masked
    assert all(t != IGNORE_INDEX for t in labels[n:])  # nothing after it masked
    assert labels[n:] == ids[n:]  # targets are the input tokens themselves
    assert tok.decode(trained(enc)) == row["output"] + tok.eos_token
    assert labels[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == ALPACA_PROMPT.format(**row) + row["output"]


@pytest.mark.parametrize(
    "row",
    [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say hi.", "input": "", "output": "hi"}],
)
def test_alpaca_without_input_uses_no_input_prompt(tok, row):
    assert alpaca_prompt(row) == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
    enc = encode(row, tok, DataConfig(template="alpaca"))
    text = tok.decode(enc["input_ids"], skip_special_tokens=True)
    assert "### Input:" not in text
    assert text == "### Instruction:\nSay hi.\n\n### Response:\nhi"
    assert tok.decode(trained(enc)) == "hi" + tok.eos_token


def test_alpaca_numeric_output_is_stringified(tok):
    enc = encode(
        {"instruction": "Add the numbers.", "input": "2+3", "output": 5}, tok, DataConfig(template="alpaca")
    )
    assert tok.decode(trained(enc)) == "5" + tok.eos_token


def test_chat_trains_only_on_assistant_turns(tok):
    cfg = DataConfig(template="chat")
    enc = encode({"messages": CONVERSATION}, tok, cfg)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(ids) == full
    target_text = tok.decode(trained(enc))
    for turn in ("FIRST REPLY", "SECOND REPLY"):
        assert turn + tok.eos_token in target_text
    for text in ("SYSTEMTEXT", "hello there", "again please", "<|user|>", "<|assistant|>", "<|system|>"):
        assert text not in target_text
    # unmasked tokens are exactly where they are in the input, in two separate runs (one per reply)
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(labels, ids, strict=True))
    runs, current = [], []
    for lab in [*labels, IGNORE_INDEX]:
        if lab != IGNORE_INDEX:
            current.append(lab)
        elif current:
            runs.append(tok.decode(current))
            current = []
    assert len(runs) == 2
    for run, reply in zip(runs, ("FIRST REPLY", "SECOND REPLY"), strict=True):
        # the reply and its EOS, at most followed by the template's separator whitespace
        assert re.fullmatch(re.escape(reply + tok.eos_token) + r"\s*", run), run


def test_chat_single_turn_target_starts_at_the_reply(tok):
    messages = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    enc = encode({"conv": messages}, tok, DataConfig(template="chat", messages_column="conv"))
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(enc["labels"][n_prompt : n_prompt + 5]) == "pong" + tok.eos_token


def test_chat_generation_item_prompts_for_the_last_reply(tok):
    item = generation_item({"messages": CONVERSATION}, tok, DataConfig(template="chat"))
    assert item["reference"] == "SECOND REPLY"
    prompt = tok.decode(item["prompt_ids"])
    assert prompt.endswith("again please\n<|assistant|>")
    assert "SECOND REPLY" not in prompt


def test_text_template_trains_on_every_token(tok):
    enc = encode({"body": "plain text, all trained"}, tok, DataConfig(template="text", text_column="body"))
    assert enc["labels"] == enc["input_ids"]
    assert IGNORE_INDEX not in enc["labels"]
    assert enc["input_ids"][0] == tok.bos_token_id
    assert enc["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "plain text, all trained"
    assert generation_item({"body": "x"}, tok, DataConfig(template="text", text_column="body")) is None


@pytest.mark.parametrize("length", [39, 40, 41, 78, 79, 80, 203])
def test_a_long_text_document_becomes_overlapping_pieces_losing_no_target(tok, length):
    row = {"text": "z" * (length - 2)}  # + BOS and EOS
    full = encode_batch({"text": [row["text"]]}, tok, DataConfig(template="text", max_length=10_000))
    pieces = encode_batch({"text": [row["text"]]}, tok, DataConfig(template="text", max_length=40))
    ids = full["input_ids"][0]
    assert len(ids) == length and not any(pieces["truncated"]) and set(pieces["document"]) == {0}
    assert all(2 <= len(p) <= 40 for p in pieces["input_ids"])
    at = 0
    for piece in pieces["input_ids"]:  # each piece starts at the previous piece's last token
        assert piece == ids[at : at + len(piece)]
        at += len(piece) - 1
    assert at == length - 1  # the pieces reach the last token: every token but the first is a target once
    assert pieces["labels"] == pieces["input_ids"]


def test_split_pieces_keeps_short_documents_whole():
    assert split_pieces([1, 2, 3], 3) == [[1, 2, 3]]
    assert split_pieces([1, 2, 3, 4], 3) == [[1, 2, 3], [3, 4]]
    assert split_pieces([1, 2, 3, 4, 5], 3) == [[1, 2, 3], [3, 4, 5]]


def test_alpaca_truncation_keeps_the_response_and_the_end_of_the_instruction(tok):
    row = {"instruction": "A" * 100 + " then the last words", "output": "ANSWER"}
    enc = encode(row, tok, DataConfig(template="alpaca", max_length=60))
    assert enc["truncated"] is True and len(enc["input_ids"]) == 60
    assert tok.decode(trained(enc)) == "ANSWER" + tok.eos_token  # every target token survives
    text = tok.decode(enc["input_ids"], skip_special_tokens=True)
    assert text.startswith("### Instruction:\n")  # the marker before the dropped content stays
    assert text.endswith("the last words\n\n### Response:\nANSWER")
    assert "A" * 100 not in text  # the start of the instruction went first


def test_alpaca_truncation_drops_the_instruction_before_the_input_end(tok):
    row = {"instruction": "I" * 30, "input": "J" * 30 + "end of input", "output": "OUT"}
    enc = encode(row, tok, DataConfig(template="alpaca", max_length=70))
    text = tok.decode(enc["input_ids"], skip_special_tokens=True)
    assert "I" not in text.replace("### Instruction", "").replace("### Input", "")
    assert text.endswith("end of input\n\n### Response:\nOUT") and "### Instruction:\n" in text
    assert tok.decode(trained(enc)) == "OUT" + tok.eos_token


def test_alpaca_response_longer_than_the_budget_is_cut_at_its_end(tok):
    row = {"instruction": "Copy.", "input": "x", "output": "y" * 200}
    enc = encode(row, tok, DataConfig(template="alpaca", max_length=40))
    assert len(enc["input_ids"]) == 40
    text = tok.decode(enc["input_ids"], skip_special_tokens=True)
    assert text.endswith("### Response:\n" + "y" * (40 - 20))  # at most half the budget for markers
    assert "Copy." not in text and "x" not in text  # content goes before any response token
    assert len(trained(enc)) == 20


def test_prompt_markers_go_from_the_start_when_content_is_not_enough(tok):
    row = {"instruction": "ab", "output": "RESPONSE"}
    full = encode(row, tok, DataConfig(template="alpaca", max_length=1000))
    n = len(full["input_ids"]) - 4  # more than the 2 content tokens must go
    enc = encode(row, tok, DataConfig(template="alpaca", max_length=n))
    assert len(enc["input_ids"]) == n
    assert enc["input_ids"][-10:] == full["input_ids"][-10:]
    assert tok.decode(trained(enc)) == "RESPONSE" + tok.eos_token


def test_chat_truncation_drops_old_turns_first_and_keeps_the_last_reply(tok):
    conv = [
        {"role": "user", "content": "OLD" * 20},
        {"role": "assistant", "content": "old reply"},
        {"role": "user", "content": "new question"},
        {"role": "assistant", "content": "NEW REPLY"},
    ]
    full = encode({"messages": conv}, tok, DataConfig(template="chat", max_length=1000))
    enc = encode({"messages": conv}, tok, DataConfig(template="chat", max_length=len(full["input_ids"]) - 50))
    text = tok.decode(enc["input_ids"])
    assert text.endswith("<|user|>new question\n<|assistant|>NEW REPLY" + tok.eos_token)
    assert "OLD" * 5 not in text and text.count("<|user|>") == 2  # content went, markers stayed
    assert "NEW REPLY" + tok.eos_token in tok.decode(trained(enc))


def test_exactly_max_length_is_one_piece_and_one_more_token_two(tok):
    n = len(encode({"text": "abcdef"}, tok, DataConfig(template="text"))["input_ids"])
    enc = encode_batch({"text": ["abcdef"]}, tok, DataConfig(template="text", max_length=n))
    assert enc["truncated"] == [False] and [len(p) for p in enc["input_ids"]] == [n]
    enc = encode_batch({"text": ["abcdef"]}, tok, DataConfig(template="text", max_length=n - 1))
    assert enc["truncated"] == [False, False] and [len(p) for p in enc["input_ids"]] == [n - 1, 2]


def test_nulls_are_nothing_to_learn_never_the_string_none(tok):
    alpaca = encode(
        {"instruction": "Say it.", "input": None, "output": None}, tok, DataConfig(template="alpaca")
    )
    assert trained(alpaca) == [] and "None" not in tok.decode(alpaca["input_ids"])
    text = encode({"text": None}, tok, DataConfig(template="text"))
    assert trained(text) == [] and "None" not in tok.decode(text["input_ids"])
    conv = [
        {"role": "system", "content": None},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    chat = encode({"messages": conv}, tok, DataConfig(template="chat"))
    assert "None" not in tok.decode(chat["input_ids"]) and tok.decode(trained(chat)) == "yo" + tok.eos_token

"""The embedded default run's data and tokenizer: synthetic tasks with exactly checkable answers.

Everything here is built locally and deterministically from a seed, so the default run needs no
network: a character-level tokenizer (saved with the model like any HF tokenizer) and a small
instruction dataset written as JSONL in the alpaca layout and then loaded through `datasets`
exactly like a user's file.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path

# task -> (instruction, make_input(rng) -> str, solve(input) -> str)
TaskSpec = tuple[str, Callable[[random.Random], str], Callable[[str], str]]


WORD_LENGTH = 4  # fixed-length inputs: a tiny model learns the position mapping in minutes on a CPU


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(WORD_LENGTH))


def _sum(text: str) -> str:
    a, b = text.split("+")
    return str(int(a) + int(b))


TASKS: dict[str, TaskSpec] = {
    "reverse": ("Reverse:", _word, lambda s: s[::-1]),
    "sort": ("Sort:", _word, lambda s: "".join(sorted(s))),
    "add": ("Add:", lambda r: f"{r.randint(10, 49)}+{r.randint(0, 9)}", _sum),
    "upper": ("Capitalize:", _word, str.upper),
    "copy": ("Copy:", _word, lambda s: s),
}


def _row(name: str, text: str) -> dict:
    """Both layouts in one row: alpaca columns and a chat `messages` column (the default template)."""
    instruction, _, solve = TASKS[name]
    answer = solve(text)
    return {
        "task": name,
        "instruction": instruction,
        "input": text,
        "output": answer,
        "messages": [
            {"role": "user", "content": f"{instruction} {text}"},
            {"role": "assistant", "content": answer},
        ],
    }


def make_examples(tasks: list[str], n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Round-robin over tasks. Eval prompts are drawn first and never appear in the train split."""
    rng = random.Random(seed)
    eval_rows: list[dict] = []
    held_out: set[tuple[str, str]] = set()
    while len(eval_rows) < n_eval:
        name = tasks[len(eval_rows) % len(tasks)]
        text = TASKS[name][1](rng)
        if (name, text) not in held_out:
            held_out.add((name, text))
            eval_rows.append(_row(name, text))
    train_rows: list[dict] = []
    while len(train_rows) < n_train:
        name = tasks[len(train_rows) % len(tasks)]
        text = TASKS[name][1](rng)
        if (name, text) not in held_out:
            train_rows.append(_row(name, text))
    return train_rows, eval_rows


def write_synthetic_data(
    out_dir: Path, tasks: list[str], n_train: int, n_eval: int, seed: int
) -> tuple[Path, Path]:
    """Write train.jsonl and eval.jsonl (atomically; regenerated identically from the same seed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train_rows, eval_rows = make_examples(tasks, n_train, n_eval, seed)
    paths = []
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        path = out_dir / f"{name}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not (path.exists() and path.read_text() == text):  # unchanged files keep datasets' cache valid
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text(text)
            tmp.replace(path)
        paths.append(path)
    return paths[0], paths[1]


def exact_match(prediction: str, reference: str) -> bool:
    """The task metric: the greedy answer equals the reference after trimming whitespace."""
    return prediction.strip() == reference.strip()


# A compact chat template (role markers are single tokens) so the default run spends its compute
# on the task rather than on formatting: "<s><|user|>Reverse: abcd\n<|assistant|>dcba</s>".
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer():
    """A character-level fast tokenizer over printable ASCII: one token per character.

    Character tokens make string tasks (reverse, sort) learnable by a tiny model in minutes. It
    is a real `PreTrainedTokenizerFast`: saved with the model, reloaded by AutoTokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(specials + chars + ROLE_TOKENS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.add_special_tokens({"additional_special_tokens": ROLE_TOKENS})
    tok.chat_template = CHAT_TEMPLATE
    return tok

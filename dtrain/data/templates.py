"""Templates: a row of the user's data -> (input_ids, labels), and truncation that keeps what is trained.

Prompt tokens are masked with IGNORE_INDEX; responses end with EOS so the model learns to stop.

Truncation to `--data.max_length` (alpaca and chat), in this order, until the example fits:
1. prompt *content* tokens (instruction, input, earlier turns' text) are dropped from the start of the
   prompt: the turn markers (`### Instruction:`, role tokens, the generation prompt) and the end of the
   instruction, right before the response, stay;
2. if that is not enough, the remaining prompt tokens are dropped from the start;
3. only when the response alone is longer than the budget is the response cut, at its end; the prompt
   then keeps its markers only (at most half the budget, the ones nearest the response).
Plain text (`text`) is never truncated: a document longer than max_length becomes consecutive pieces of
max_length tokens, each starting at the previous piece's last token. That token is a target in the piece
before and the (never trained) first token of the next, so every token of the document but its first is
a target exactly once, and no target is lost at a piece boundary.
"""

from __future__ import annotations

from dtrain.config import DataConfig, UserError

IGNORE_INDEX = -100  # label value that never counts in the loss

# Alpaca layout without the long preamble (it would triple the sequence length of short tasks).
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

Span = tuple[int, int]  # [start, end) in characters


def text_of(value) -> str:
    """A cell as text: numbers as written, a null as nothing (never the string "None")."""
    return "" if value is None else str(value)


def _messages(messages) -> list[dict]:
    """Chat messages with null contents as empty strings (a template would render them as "None")."""
    return [{**m, "content": text_of(m.get("content"))} for m in messages or []]


def alpaca_prompt(row: dict) -> str:
    return alpaca_prompt_spans(row)[0]


def alpaca_prompt_spans(row: dict) -> tuple[str, list[Span]]:
    """The rendered alpaca prompt and the character spans of its content (instruction, input)."""
    fields = {"instruction": text_of(row["instruction"])}
    template = ALPACA_PROMPT_NO_INPUT
    if row.get("input") not in (None, ""):
        fields["input"] = text_of(row["input"])
        template = ALPACA_PROMPT
    text, spans, rest = "", [], template
    while "{" in rest:  # literal markers and {field}s, in order
        head, _, tail = rest.partition("{")
        name, _, rest = tail.partition("}")
        text += head
        spans.append((len(text), len(text) + len(fields[name])))
        text += fields[name]
    return text + rest, spans


def _chat_spans(tokenizer, messages: list[dict]) -> tuple[str, list[Span]]:
    """Render a conversation; return the text and the character spans of assistant turns."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(upto):
            raise UserError(
                "the tokenizer's chat template does not render conversations prefix by prefix; "
                "use --data.template text or a standard chat template"
            )
        spans.append((start, len(upto)))
    return full, spans


def _content_spans(text: str, messages: list[dict], before: int) -> list[Span]:
    """Where each message's content sits in the rendered text, up to char `before` (templates that
    rewrite content are simply not found there, and their tokens count as markers)."""
    spans, cursor = [], 0
    for m in messages:
        content = m.get("content")
        if not isinstance(content, str) or not content:
            continue
        at = text.find(content, cursor)
        if at < 0 or at >= before:
            continue
        spans.append((at, min(at + len(content), before)))
        cursor = at + len(content)
    return spans


def _in_spans(offset: tuple[int, int], spans: list[Span]) -> bool:
    start, end = offset
    return end > start and any(s <= start < e for s, e in spans)


def fit(ids: list[int], labels: list[int], content: list[bool], response_start: int, n: int):
    """Cut one example to n tokens by the rule in the module docstring. `content[i]`: token i of the
    prompt is droppable content (not a marker); tokens from `response_start` on are the response."""
    if len(ids) <= n:
        return ids, labels
    prompt = range(response_start)
    if len(ids) - response_start <= n:
        excess, drop = len(ids) - n, set()
        for droppable_first in (True, False):
            for i in prompt:
                if excess == 0:
                    break
                if i not in drop and (content[i] or not droppable_first):
                    drop.add(i)
                    excess -= 1
        keep = [i for i in range(len(ids)) if i not in drop]
    else:
        markers = [i for i in prompt if not content[i]][-(n // 2) :] if n >= 2 else []
        keep = markers + list(range(response_start, response_start + n - len(markers)))
    return [ids[i] for i in keep], [labels[i] for i in keep]


def _encode_alpaca(rows: list[dict], tokenizer) -> list[tuple]:
    rendered = [alpaca_prompt_spans(r) for r in rows]
    texts = [text for text, _ in rendered]
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=fast)
    answers = tokenizer([text_of(r["output"]) for r in rows], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for i, (p, a) in enumerate(zip(enc["input_ids"], answers, strict=True)):
        spans = rendered[i][1]
        content = [_in_spans(o, spans) for o in enc["offset_mapping"][i]] if fast else [False] * len(p)
        reply = [] if rows[i]["output"] is None else a + eos  # a missing output trains nothing, not "None"
        out.append((p + reply, [IGNORE_INDEX] * len(p) + reply, content, len(p)))
    return out


def _encode_chat(messages: list[dict], tokenizer) -> tuple:
    text, spans = _chat_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [
        tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
        for tok, (start, _) in zip(ids, offsets, strict=True)
    ]
    reply = spans[-1][0] if spans else len(text)  # the last assistant turn is the response
    response_start = next((i for i, (start, _) in enumerate(offsets) if start >= reply), len(ids))
    content_spans = _content_spans(text, messages, reply)
    content = [_in_spans(o, content_spans) for o in offsets[:response_start]]
    return ids, labels, content, response_start


def split_pieces(ids: list[int], n: int) -> list[list[int]]:
    """A document as consecutive pieces of at most n tokens, piece k+1 starting at piece k's last token
    (see the module docstring). A document of n tokens or fewer is one piece."""
    if len(ids) <= n or n < 2:
        return [ids[:n]] if n < 2 else [ids]
    return [ids[start : start + n] for start in range(0, len(ids) - 1, n - 1)]


def encode_batch(batch: dict[str, list], tokenizer, cfg: DataConfig) -> dict[str, list]:
    """Examples -> input_ids, labels, truncated flags (one tokenizer call per column, not per row). The
    text template returns one row per piece of a long document (so maybe more rows than it was given),
    with `document`: the index of the row it came from in this batch."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    if cfg.template == "alpaca":
        encoded = _encode_alpaca(rows, tokenizer)
    elif cfg.template == "chat":
        encoded = [_encode_chat(_messages(r[cfg.messages_column]), tokenizer) for r in rows]
    else:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        texts = tokenizer([text_of(r[cfg.text_column]) for r in rows], add_special_tokens=True)["input_ids"]
        missing = [r[cfg.text_column] is None for r in rows]  # a null row trains nothing, not "None"
        encoded = [
            (t, [IGNORE_INDEX] * len(t), [], 0) if m else (t + eos, t + eos, [], 0)
            for t, m in zip(texts, missing, strict=True)
        ]
    out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": [], "document": []}
    for doc, (ids, labels, content, response_start) in enumerate(encoded):
        if cfg.template == "text":
            pieces = list(
                zip(split_pieces(ids, cfg.max_length), split_pieces(labels, cfg.max_length), strict=True)
            )
        else:
            pieces = [fit(ids, labels, content, response_start, cfg.max_length)]
        for piece_ids, piece_labels in pieces:
            out["input_ids"].append(piece_ids)
            out["labels"].append(piece_labels)
            out["truncated"].append(cfg.template != "text" and len(ids) > cfg.max_length)
            out["document"].append(doc)
    return out


def encode(row: dict, tokenizer, cfg: DataConfig) -> dict:
    """One example (see `encode_batch`; a long text document: its first piece)."""
    out = encode_batch({k: [v] for k, v in row.items()}, tokenizer, cfg)
    return {k: v[0] for k, v in out.items() if k != "document"}


def generation_item(row: dict, tokenizer, cfg: DataConfig) -> dict | None:
    """Prompt ids and reference answer for the exact-match metric (None for plain text)."""
    if cfg.template == "alpaca":
        prompt = tokenizer(alpaca_prompt(row), add_special_tokens=True)["input_ids"]
        reference = text_of(row["output"])
    elif cfg.template == "chat":
        messages = _messages(row[cfg.messages_column])
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return None
        text = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        reference = messages[last]["content"]
    else:
        return None
    return {"prompt_ids": prompt[-cfg.max_length :], "reference": reference, "task": row.get("task") or "all"}


def has_target(labels: list[int]) -> bool:
    """Whether an example trains anything (the first token is never a target: nothing predicts it)."""
    return any(t != IGNORE_INDEX for t in labels[1:])

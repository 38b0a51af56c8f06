"""The benchmark's non-dtrain processes: `python bench/cases.py KIND SPEC.json RESULT.json`.

Each call is one fresh process (started by bench/run.py), so imports, memory and peak RSS belong to
that case alone. KIND is one of:

- prepare: the seeded synthetic SFT data (chat `messages` column, long-tailed lengths), the models saved
  with `save_pretrained` next to dtrain's char tokenizer, and the data tokenized by dtrain's own template
  code (`dtrain.data.templates.encode_batch`) in dtrain's own data order (`dtrain.data.DataOrder`), so the
  loops below and the Trainer read exactly the batches dtrain reads. A model with `family: gpt2` is a
  user's GPT-2 directory instead: real text (Python source files of this interpreter's site-packages, a
  `text` column), a byte-level BPE tokenizer trained on it (no pad token, as GPT-2 ships), its own
  ordered rows (`text` template: long files become consecutive pieces of max_length).
- loop: a minimal hand-written Accelerate loop (accumulate, backward, clip, optimizer.step, zero_grad),
  padding each batch to its longest row (`pad: longest`, no attention mask, as dtrain) or to max_length
  with the attention mask (`pad: max_length`, the tutorial loop).
- trainer: transformers Trainer, dynamic padding (DataCollatorForSeq2Seq), padding-free
  (DataCollatorWithFlattening) or plain language modelling (DataCollatorForLanguageModeling, mlm off,
  pad = EOS: the GPT-2 recipe), sequential sampler over the dtrain-ordered rows.

Timing: from the end of optimizer step `warmup` to the end of the last step (data loading included, as
in dtrain's log intervals); real (non-padding) tokens are counted on the host from the collated batches.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path

IGNORE_INDEX = -100


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_cuda_mib() -> float:
    """What dtrain logs as peak_memory_mib on CUDA: the caching allocator's peak handed out."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


# --------------------------------------------------------------------------------------------
# prepare: data and models
# --------------------------------------------------------------------------------------------

TOPICS = ["Summarize", "Explain", "Describe", "List", "Rewrite", "Translate", "Answer", "Continue"]


def example_lengths(rng: random.Random, max_length: int) -> int:
    """Characters (= tokens with the char tokenizer) in a response: long-tailed. Most are short
    (log-normal around 12% of max_length), 4% reach max_length (and are truncated there)."""
    if rng.random() < 0.04:
        return int(max_length * rng.uniform(0.85, 1.1))
    return max(4, min(int(rng.lognormvariate(math.log(0.12 * max_length), 0.6)), int(0.7 * max_length)))


def make_rows(n: int, max_length: int, seed: int, long_only: bool = False) -> list[dict]:
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
        for _ in range(600)
    ]

    def text(chars: int) -> str:
        out = ""
        while len(out) < chars:
            out += rng.choice(words) + " "
        return out[:chars].strip() or "ok"

    rows = []
    for _ in range(n):
        prompt = f"{rng.choice(TOPICS)}: {text(rng.randint(8, 32))}"
        size = int(max_length * rng.uniform(0.95, 1.05)) if long_only else example_lengths(rng, max_length)
        rows.append(
            {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text(size)}]}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def save_model(path: Path, tok, shape: dict, max_positions: int, dtype: str = "float32") -> dict:
    """A randomly initialised Llama saved with save_pretrained next to the tokenizer; returns its facts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = shape.get("vocab_size") or -(-len(tok) // 64) * 64  # rounded up, as real checkpoints pad it
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 1B init takes a minute on CPU
        model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    model.to(getattr(torch, dtype)).save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return {
        "path": str(path),
        "params": params,
        "embedding_params": embed,
        "layers": shape["layers"],
        "heads": shape["heads"],
        "head_dim": shape["hidden"] // shape["heads"],
        "hidden": shape["hidden"],
        "vocab_size": vocab,
    }


def length_stats(lengths: list[int]) -> dict:
    s = sorted(lengths)

    def q(f):
        return s[min(len(s) - 1, int(f * len(s)))]

    return {
        "examples": len(s),
        "mean": sum(s) / len(s),
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "max": s[-1],
    }


def prepare(spec: dict) -> dict:
    import torch

    from dtrain.config import DataConfig
    from dtrain.data import DataOrder
    from dtrain.data.templates import encode_batch
    from dtrain.tasks import build_char_tokenizer

    work = Path(spec["work"])
    (work / "data").mkdir(parents=True, exist_ok=True)
    max_length, seed = spec["max_length"], spec["seed"]
    rows = make_rows(spec["train_examples"], max_length, seed)
    data = work / "data"
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "eval.jsonl", make_rows(4, max_length, seed + 1))
    write_jsonl(data / "long.jsonl", make_rows(64, max_length, seed + 2, long_only=True))
    tok = build_char_tokenizer()

    # the tokens dtrain trains on, in dtrain's order (positions 0..P-1 of its seeded stream)
    cfg = DataConfig(template="chat", max_length=max_length)
    enc = encode_batch({"messages": [r["messages"] for r in rows]}, tok, cfg)
    order = DataOrder(len(rows), spec["train_seed"])
    positions = spec["positions"]
    if spec.get("token_steps"):  # [tokens per step, steps]: as many examples as that takes, and a margin
        tokens, steps = spec["token_steps"]
        mean = sum(len(x) for x in enc["input_ids"]) / len(rows)
        positions = max(positions, steps * (round(tokens / mean) + 1))
    with open(data / "ordered.jsonl", "w") as fh:
        for p in range(positions):
            i = order.index(p)
            fh.write(json.dumps({"input_ids": enc["input_ids"][i], "labels": enc["labels"][i]}) + "\n")

    models, paths = {}, {k: str(data / f"{k}.jsonl") for k in ("train", "eval", "long", "ordered")}
    for name, shape in spec["models"].items():
        if shape.get("family") == "gpt2":
            models[name] = prepare_gpt2(work, name, shape, spec, paths)
            continue
        models[name] = save_model(
            work / "models" / name, tok, shape, spec["max_positions"], shape.get("save_dtype", "float32")
        )
    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {
        "models": models,
        "lengths": length_stats([len(x) for x in enc["input_ids"]]),
        "truncated": int(sum(enc["truncated"])),
        "device": device,
        "paths": paths,
    }


def python_sources(documents: int, seed: int) -> list[str]:
    """Real text: `documents` Python files of 2-60 KB from the installed transformers package, in a
    seeded order (the same files on every run of one install)."""
    import transformers

    root = Path(transformers.__file__).parent
    files = sorted(p for p in root.rglob("*.py") if 2_000 < p.stat().st_size < 60_000)
    random.Random(seed).shuffle(files)
    return [p.read_text(errors="replace") for p in files[:documents]]


def prepare_gpt2(work: Path, name: str, shape: dict, spec: dict, paths: dict) -> dict:
    """A user's GPT-2 directory (random init, tied head, GPT-2's default dropout) with a byte-level BPE
    tokenizer trained on the same Python files, no pad token; `<name>_train` / `_eval` / `_ordered` data
    (a `text` column; ordered rows as dtrain's text template cuts them, in dtrain's order)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from dtrain.config import DataConfig
    from dtrain.data import DataOrder
    from dtrain.data.templates import encode_batch

    texts = python_sources(shape["documents"], spec["seed"])
    eos = "<|endoftext|>"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=shape["vocab_size"], min_frequency=2, special_tokens=[eos], show_progress=False
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=eos, eos_token=eos, unk_token=eos
    )
    config = GPT2Config(
        vocab_size=shape.get("model_vocab_size") or len(tok),  # e.g. GPT-2's 50,257 over a smaller BPE
        n_positions=spec["max_positions"],
        n_embd=shape["hidden"],
        n_layer=shape["layers"],
        n_head=shape["heads"],
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    path = work / "models" / name
    model.save_pretrained(path)
    tok.save_pretrained(path)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / f"{name}_train.jsonl", [{"text": t} for t in texts])
    write_jsonl(data / f"{name}_eval.jsonl", [{"text": t[:2000]} for t in texts[:4]])
    cfg = DataConfig(template="text", max_length=spec["max_length"])
    enc = encode_batch({"text": texts}, tok, cfg)
    order = DataOrder(len(enc["input_ids"]), spec["train_seed"])
    with open(data / f"{name}_ordered.jsonl", "w") as fh:
        for p in range(spec["gpt2_positions"]):
            i = order.index(p)
            fh.write(json.dumps({"input_ids": enc["input_ids"][i], "labels": enc["labels"][i]}) + "\n")
    paths.update({f"{name}_{k}": str(data / f"{name}_{k}.jsonl") for k in ("train", "eval", "ordered")})
    params = sum(p.numel() for p in model.parameters())
    return {
        "path": str(path),
        "family": "gpt2",
        "params": params,
        "embedding_params": model.get_input_embeddings().weight.numel(),
        "layers": shape["layers"],
        "heads": shape["heads"],
        "head_dim": shape["hidden"] // shape["heads"],
        "hidden": shape["hidden"],
        "vocab_size": config.vocab_size,
        "documents": len(texts),
        "rows": len(enc["input_ids"]),
        "mean_length": sum(len(x) for x in enc["input_ids"]) / len(enc["input_ids"]),
    }


# --------------------------------------------------------------------------------------------
# shared by the loops and the Trainer
# --------------------------------------------------------------------------------------------


def ordered_rows(path: str, count: int) -> list[dict]:
    rows = []
    with open(path) as fh:
        for line in fh:
            rows.append(json.loads(line))
            if len(rows) == count:
                break
    if len(rows) < count:
        raise SystemExit(f"bench: {path} has {len(rows)} rows, {count} needed")
    return rows


def pad_batch(rows: list[dict], width: int, pad_id: int):
    """Every row padded to `width` (max_length), mask included: the tutorials' batches. dtrain's collator
    pads to a multiple of its argument, so with width = max_length that is exactly max_length."""
    from dtrain.data import Collator

    return Collator(pad_id, pad_to_multiple_of=width)(rows)


class Clock:
    """Seconds and real tokens from the end of step `warmup` to the end of the last step."""

    def __init__(self, warmup: int, cuda: bool):
        self.warmup, self.cuda = warmup, cuda
        self.start = self.end = None
        self.step_ends: list[float] = []  # perf_counter at the end of each step (no device sync)
        self.step_tokens: list[int] = []  # real tokens of optimizer step k (1-based: index k-1)
        self.step_positions: list[int] = []

    def mark(self, step: int, last: int) -> None:
        self.step_ends.append(time.perf_counter())
        if step == self.warmup or step == last:
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            now = time.perf_counter()
            if step == self.warmup:
                self.start = now
            if step == last:
                self.end = now

    def result(self, steps: int, **extra) -> dict:
        measured = steps - self.warmup
        seconds = self.end - self.start
        tokens = sum(self.step_tokens[self.warmup : steps])
        positions = sum(self.step_positions[self.warmup : steps])
        return {
            "measured_steps": measured,
            "seconds": seconds,
            "step_time_s": seconds / measured,
            "tokens": tokens,
            "tokens_per_sec": tokens / seconds,
            "tokens_per_step": tokens / measured,
            "padding_fraction": 1.0 - tokens / max(positions, 1),
            "peak_rss_mib": peak_rss_mib(),
            "peak_memory_mib_logged": peak_cuda_mib() if self.cuda else None,
            "step_ends": self.step_ends,  # per-step timings, for a look at the spread (CPU: exact)
            "step_tokens": self.step_tokens,
            **extra,
        }


def adamw_groups(model, weight_decay: float):
    """dtrain's grouping (decay on matrices only), so the optimizers do the same work."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------
# loop: minimal Accelerate loop
# --------------------------------------------------------------------------------------------


def loop(spec: dict) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, get_scheduler

    steps, warmup, batch = spec["steps"], spec["warmup"], spec["batch"]
    set_seed(spec["seed"])
    accelerator = Accelerator(
        gradient_accumulation_steps=1, mixed_precision=spec.get("mixed_precision", "no")
    )
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    pad_id = model.config.pad_token_id or 0
    o = spec["optim"]
    optimizer = torch.optim.AdamW(
        adamw_groups(model, o["weight_decay"]), lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"]
    )
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=o["warmup_steps"], num_training_steps=steps
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    rows = ordered_rows(spec["ordered"], steps * batch)
    to_max = spec["pad"] == "max_length"

    def batches():
        for k in range(steps):
            part = rows[k * batch : (k + 1) * batch]
            width = spec["max_length"] if to_max else max(len(r["input_ids"]) for r in part)
            yield pad_batch(part, width, pad_id)

    clock = Clock(warmup, accelerator.device.type == "cuda")
    losses = []
    for step, b in enumerate(batches(), start=1):
        clock.step_tokens.append(int(b["attention_mask"].sum()))
        clock.step_positions.append(b["attention_mask"].numel())
        b = {k: v.to(accelerator.device, non_blocking=True) for k, v in b.items()}
        with accelerator.accumulate(model):
            if to_max:  # the tutorial loop: the whole padded batch, mask included
                loss = model(**b).loss
            else:  # as dtrain: right-padded, so the causal mask alone is exact; no mask, no KV cache
                loss = model(input_ids=b["input_ids"], labels=b["labels"], use_cache=False).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), spec["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if step % spec["log_every"] == 0 or step == steps:
            losses.append(loss.item())  # the host sync of a logging step, as dtrain's
        clock.mark(step, steps)
    return clock.result(steps, loss_first=losses[0], loss_last=losses[-1])


# --------------------------------------------------------------------------------------------
# trainer: transformers Trainer
# --------------------------------------------------------------------------------------------


def trainer(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    steps, warmup, batch = spec["steps"], spec["warmup"], spec["batch"]
    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    kwargs = {"dtype": torch.float32}
    if spec.get("attn_implementation"):
        kwargs["attn_implementation"] = spec["attn_implementation"]
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], **kwargs)
    rows = ordered_rows(spec["ordered"], steps * batch)
    dataset = Dataset.from_list(rows)
    clock = Clock(warmup, cuda)

    if spec["collator"] == "lm":  # the GPT-2 recipe: labels = input_ids, padding (= EOS) masked
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        lm = DataCollatorForLanguageModeling(tok, mlm=False)

        def inner(features):  # input_ids only: this collator makes the labels
            return lm([{"input_ids": f["input_ids"]} for f in features])

        def count(b):
            return int(b["attention_mask"].sum()), b["attention_mask"].numel()

    elif spec["collator"] == "flatten":
        inner = DataCollatorWithFlattening(
            return_flash_attn_kwargs=spec.get("attn_implementation") == "flash_attention_2"
        )

        def count(b):  # one row, no padding at all
            return b["input_ids"].numel(), b["input_ids"].numel()

    else:
        inner = DataCollatorForSeq2Seq(
            tok, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8 if cuda else None
        )

        def count(b):
            return int(b["attention_mask"].sum()), b["attention_mask"].numel()

    def collate(features):  # counts real tokens on the host, in the order the steps consume them
        b = inner(features)
        real, positions = count(b)
        clock.step_tokens.append(real)
        clock.step_positions.append(positions)
        return b

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.mark(state.global_step, steps)

    o = spec["optim"]
    args = TrainingArguments(
        output_dir=spec["output_dir"],
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        learning_rate=o["lr"],
        weight_decay=o["weight_decay"],
        adam_beta1=o["beta1"],
        adam_beta2=o["beta2"],
        adam_epsilon=o["eps"],
        lr_scheduler_type="cosine",
        warmup_steps=o["warmup_steps"],
        max_grad_norm=spec["max_grad_norm"],
        optim="adamw_torch_fused" if cuda else "adamw_torch",  # as dtrain: fused on CUDA, foreach on CPU
        bf16=spec.get("mixed_precision") == "bf16",
        logging_steps=spec["log_every"],
        logging_nan_inf_filter=False,  # its per-step isnan check is a host sync: off, for Trainer's best
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        train_sampling_strategy="sequential",  # the dtrain-ordered rows: the same batches as dtrain
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not cuda,
        seed=spec["seed"],
    )
    t = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[Timer()])
    out = t.train()
    losses = [r["loss"] for r in t.state.log_history if "loss" in r]
    emb = model.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters())
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    flops_per_token = (
        6 * (n - emb) + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * spec["max_length"]
    )
    return clock.result(
        steps,
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else out.training_loss,
        flops_per_token=flops_per_token,
        attn_implementation=model.config._attn_implementation,
    )


KINDS = {"prepare": prepare, "loop": loop, "trainer": trainer}


def main() -> int:
    kind, spec_path, result_path = sys.argv[1:4]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = KINDS[kind](read_json(spec_path))
    write_json(result_path, result)
    return 0


if __name__ == "__main__":
    from dtrain.process import exit_with  # the way dtrain's own processes end: like with like

    exit_with(main())

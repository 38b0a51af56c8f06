"""The run configuration: typed sections, parsing, validation. Imports nothing of dtrain.

The dataclass defaults below *are* the embedded default run (`python dtrain/train.py` with no
arguments); recipes in `dtrain/recipes/` and command-line flags override them. Parsing is done
by jsonargparse: `--config recipe.yaml`, then dotted overrides in either form
(`--train.max_steps 50`, `--train.max_steps=50`), `--print_config` to show the result.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Literal

import yaml


class UserError(Exception):
    """A problem the user can fix (config, data, paths): printed as one line, no traceback, exit 2."""


class ConfigError(UserError):
    """A problem in the config itself, found before anything is loaded."""


# --------------------------------------------------------------------------------------------
# The schema. One docstring under every field: it is the --help text.
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name_or_path: str | None = None
    """Local directory or hub id of any AutoModelForCausalLM; null builds the embedded tiny Llama."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; null = same as name_or_path (or the embedded char tokenizer)."""
    trust_remote_code: bool = False
    """Allow model/tokenizer code from the hub repo to run. Off unless you trust the repo."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in. Keep float32 with mixed precision (fp32 master weights)."""
    attn_implementation: str | None = None
    """Attention kernel: sdpa, eager, flash_attention_2, flash_attention_3 or a kernels hub id (when
    installed); null lets transformers choose (sdpa where the model supports it)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in backward: ~30% slower, far less activation memory. null = on with
    --peft.method qlora (the way QLoRA fits), off otherwise."""
    resize_embeddings: bool = False
    """Grow the embedding (and head) to the tokenizer's vocabulary when it is larger (tokens added on
    purpose); otherwise a tokenizer larger than the model's embedding is refused as a mismatch."""
    hidden_size: int = 128
    """Embedded model only: width."""
    num_layers: int = 4
    """Embedded model only: decoder layers."""
    num_heads: int = 4
    """Embedded model only: attention heads (hidden_size must divide evenly)."""
    intermediate_size: int = 512
    """Embedded model only: MLP width (~4 x hidden_size)."""


@dataclass
class PeftConfig:
    method: Literal["none", "lora", "qlora"] = "none"
    """none: train every weight. lora: train low-rank adapters (peft) on a frozen model. qlora: the same on
    a base loaded in 4-bit NF4 with double quantisation (bitsandbytes), computing in the precision of
    --train.mixed_precision. Checkpoints then hold the adapters and their optimizer state only."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Adapter scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input (0.05-0.1 helps on small data)."""
    target_modules: list[str] | None = None
    """Module names (or name suffixes) that get adapters; null = every linear layer of the decoder (not the
    output head), resolved from the model and listed in the start-up line."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved beside the adapters, e.g. [embed_tokens, lm_head] when tokens were
    added to the tokenizer."""


@dataclass
class SourceConfig:
    """One entry of data.sources. Unset fields (null) take the data section's value."""

    path: str
    """Train data of this source: a json/jsonl/csv/parquet file, a directory of them, a `datasets`
    save_to_disk directory, or a hub dataset name."""
    name: str | None = None
    """Name in logs and metrics (eval_loss/<name>); null = the file's stem (or the hub id's last part)."""
    weight: float = 1.0
    """Share of the train tokens drawn from this source, relative to the other sources' weights (2 and 1:
    two thirds and one third). A source that runs out starts a new epoch, reshuffled, so a weight above
    its size oversamples it and one below undersamples it."""
    template: Literal["alpaca", "chat", "text"] | None = None
    """This source's template; null = data.template."""
    text_column: str | None = None
    """null = data.text_column."""
    messages_column: str | None = None
    """null = data.messages_column."""
    chat_template: str | None = None
    """null = data.chat_template."""
    split: str | None = None
    """null = data.split."""
    eval_path: str | None = None
    """Held-out data of this source; null holds out eval_fraction of path, by document."""
    eval_fraction: float | None = None
    """null = data.eval_fraction; 0 holds nothing out of this source."""


@dataclass
class DataConfig:
    path: str | None = None
    """Train data: local json/jsonl/csv/parquet file, a `datasets.save_to_disk` directory, or a hub
    dataset name: the one-source shorthand of data.sources. null (and no sources) generates the
    embedded synthetic tasks into <output_dir>/data/."""
    sources: list[SourceConfig] | None = None
    """Several sources mixed by weight (each with its own template, columns, split and eval data), e.g.
    [{path: web.jsonl, template: text, weight: 3}, {path: chat.jsonl, weight: 1}]. A weight counts train
    tokens; the blend is the same at every position whatever max_steps or the number of processes."""
    eval_path: str | None = None
    """Eval data (same forms as path). null holds out eval_fraction of path (or the synthetic eval set)."""
    eval_fraction: float = 0.02
    """Fraction of the train documents held out for eval when eval_path is null (a fixed split: the same
    documents whatever the seed); 0 holds nothing out."""
    split: str = "train"
    """Split to read from hub datasets or DatasetDicts."""
    template: Literal["alpaca", "chat", "text"] = "chat"
    """chat: the tokenizer's chat template over a messages column; alpaca: instruction/input/output
    columns; text: plain pretraining text. Only responses are trained on (chat, alpaca)."""
    text_column: str = "text"
    """Column read by the text template."""
    messages_column: str = "messages"
    """Column read by the chat template (list of {role, content})."""
    chat_template: str | None = None
    """A Jinja chat template file used instead of the tokenizer's chat template (or when it has none)."""
    max_length: int = 128
    """Tokens per example. text: a longer document is split into consecutive pieces of max_length tokens
    (overlapping by one token, so every token is a target once): nothing is lost. chat and alpaca: a
    longer example is truncated (prompt first; counted in the log), never dropped."""
    packing: bool = False
    """Pack examples end to end into rows of max_length tokens (best-fit decreasing, within each source),
    each attending only to itself (position ids restart per example, no attention mask): no compute spent
    on padding. A train "sample" is then a packed row. Eval is never packed."""
    prepared: str | None = None
    """A directory written by `dtrain prepare`: read memory-mapped on every rank, no tokenization. Its
    manifest must match this run's sources, tokenizer, max_length and packing."""
    num_proc: int = 1
    """Worker processes that tokenize (on the main process only; the other ranks wait for it)."""
    prepare_timeout_s: int = 86400
    """How long the other ranks wait for the main process to tokenize before giving up (exit 2)."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process)."""
    synthetic_tasks: list[str] = field(default_factory=lambda: ["reverse", "sort", "add", "upper"])
    """Embedded data only: which tasks to generate (reverse, sort, add, upper, copy)."""
    synthetic_train_examples: int = 20000
    """Embedded data only: number of training examples."""
    synthetic_eval_examples: int = 256
    """Embedded data only: held-out eval examples (prompts never seen in training)."""


@dataclass
class TrainConfig:
    max_steps: int | None = 1000
    """Optimizer steps (not micro-steps). Set null and use num_epochs to size by data instead."""
    num_epochs: float | None = None
    """Passes over the train data; only when max_steps is null."""
    seed: int = 42
    """Seeds model init, data order and dropout; the same seed reproduces the run."""
    per_device_batch_size: int = 32
    """Examples per micro-batch per process. Global batch = this x accumulation x processes."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    """null = whatever the launch config says (accelerate config / --mixed_precision)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    loss_chunk_size: int = 0
    """Compute the output head and the cross-entropy this many tokens at a time, recomputed in backward, so
    the full [tokens, vocab] logits never exist at once (large vocabularies); 0 = the plain loss."""
    compile: bool = False
    """torch.compile the model through Accelerate: its repeated decoder layers compiled once and reused
    (regional compilation), so start-up costs one layer's compile, not the whole model's."""
    nonfinite: Literal["skip", "halt", "rollback"] = "skip"
    """A step whose loss or gradient norm is NaN/Inf on any rank (agreed by all): skip = drop the update on
    every rank (no parameter, optimizer, schedule or scaler change) and go on; halt = stop at once (exit
    code 65), the newest checkpoint being the resume point; rollback = reload the newest checkpoint and
    go on past the window that faulted."""
    max_nonfinite_steps: int = 10
    """skip: stop (exit code 65) after this many non-finite steps in a row; rollback: after this many
    rollbacks in the run."""
    collective_timeout_s: int = 1800
    """How long a rank waits in a collective (all-reduce, barrier) for the others before giving up with
    exit code 69: a rank that died or hung ends the job instead of holding every GPU forever."""


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "adamw_8bit_ao", "adafactor", "sgd"] = "adamw"
    """Optimizer. adamw_8bit and paged_adamw_8bit need bitsandbytes (extra `bnb`; not under FSDP);
    adamw_8bit_ao is torchao's AdamW8bit (extra `torchao`; works on FSDP's sharded parameters)."""
    lr: float = 3e-3
    """Peak learning rate (after warmup). 3e-3 suits the embedded tiny model; ~1e-5..2e-4 for fine-tuning."""
    head_lr: float | None = None
    """Separate peak learning rate for the output head (lm_head); null = lr."""
    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to biases, norm weights or embeddings of size 1-D."""
    beta1: float = 0.9
    """Adam beta1 (SGD: momentum)."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    scheduler: Literal["linear", "cosine", "cosine_with_restarts", "constant_with_warmup", "wsd"] = "cosine"
    """Learning-rate schedule after warmup. wsd = warmup, stable, then decay over decay_fraction."""
    warmup_steps: int | None = None
    """Warmup in optimizer steps; overrides warmup_ratio when set."""
    warmup_ratio: float = 0.05
    """Warmup as a fraction of max_steps (used when warmup_steps is null)."""
    min_lr_ratio: float = 0.0
    """cosine and wsd: final lr as a fraction of lr."""
    decay_fraction: float = 0.2
    """wsd: fraction of max_steps spent decaying at the end."""
    num_cycles: int = 2
    """cosine_with_restarts: number of hard restarts."""


@dataclass
class EvalConfig:
    steps: int = 250
    """Evaluate every this many optimizer steps (0 = only at the end). Always evaluates at the end."""
    at_start: bool = False
    """Also evaluate before the first step (the untrained baseline, logged as step 0)."""
    batch_size: int | None = None
    """Eval micro-batch per process; null = train.per_device_batch_size."""
    metric: Literal["loss", "exact_match"] = "loss"
    """Metric tracked for `best` and early stopping. exact_match needs references (alpaca/chat)."""
    num_generate: int = 256
    """Eval prompts answered greedily for exact match (0 disables the task metric)."""
    max_new_tokens: int = 24
    """Longest generated answer."""
    early_stopping_patience: int = 0
    """Stop after this many evals without improvement of `metric` (0 disables)."""
    num_samples: int = 4
    """Sample generations printed and saved to samples.jsonl at the end."""


@dataclass
class CheckpointConfig:
    save_steps: int = 250
    """Save a resumable checkpoint every this many optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """Newest complete checkpoints kept; older ones are deleted only after a newer one is committed."""
    keep_best: bool = True
    """Also keep the checkpoint with the best eval.metric (never rotated away; linked as checkpoints/best).
    Only checkpoints saved at an eval step have a metric: make save_steps a multiple of eval.steps."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this, as milestones (0 = none)."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output_dir (fresh start if none; a corrupt
    one is set aside and the one before it used); never: always start fresh; or a checkpoint path."""
    allow_config_change: bool = False
    """Resume even though model, data, seed, batch, optimizer or precision differ from the checkpoint's run."""
    async_save: bool = False
    """Save in the background: the save step copies the state to host memory (one extra copy of this rank's
    model and optimizer state) and training goes on while a writer thread writes, agrees and commits it.
    DCP profiles only (single_gpu, ddp, fsdp, hsdp); refused under DeepSpeed."""


@dataclass
class LogConfig:
    every_steps: int = 25
    """Log (and sync device metrics to the host) every this many optimizer steps."""
    report_to: Literal["none", "tensorboard", "wandb", "trackio", "mlflow"] = "none"
    """Tracker used through Accelerate's log_with (besides metrics.jsonl, which is always written)."""
    project: str = "dtrain"
    """Tracker project name."""
    progress_bar: bool = True
    """Show a progress bar on the main process."""
    plots: bool = True
    """Draw the run's curves (loss, lr, gradient norm, throughput, memory) as PNGs in <output_dir>/plots/ at
    each eval and at the end, embedded in summary.md. Needs matplotlib (extra `plot`); without it the run
    trains and says once that plots are off."""
    profile_steps: str | None = None
    """Record these optimizer steps with torch.profiler, e.g. "3-4" (numbered as logged, so the same after a
    resume): one Perfetto trace per rank in <output_dir>/profile/, a CUDA memory snapshot on GPUs, and the
    top operators in the log. null = off (and free)."""


@dataclass
class Config:
    output_dir: str = "runs/default"
    """Run directory: config.yaml, run_info.json, metrics.jsonl, checkpoints/, final/."""
    overwrite_output_dir: bool = False
    """Start over in an output_dir that holds an earlier run (its dtrain files are removed)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECTION_CLASSES = {
    "model": ModelConfig,
    "peft": PeftConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "optim": OptimConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. `train.max_steps`."""
    keys = ["output_dir", "overwrite_output_dir"]
    for section, cls in _SECTION_CLASSES.items():
        keys += [f"{section}.{f.name}" for f in fields(cls)]
    return keys


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog="dtrain train",
        description="Train a causal LM with one Accelerate loop. Flags override --config; "
        "both `--train.max_steps 50` and `--train.max_steps=50` work.",
        exit_on_error=False,
        default_meta=False,
        allow_abbrev=False,  # `--train.max_step` is a typo, not --train.max_steps
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML recipe (e.g. a run's config.yaml).")
    top = {f.name: f for f in fields(Config)}
    for name in ("output_dir", "overwrite_output_dir"):
        parser.add_argument(
            f"--{name}", type=type(top[name].default), default=top[name].default, help=_TOP_DOCS[name]
        )
    for section, cls in _SECTION_CLASSES.items():
        parser.add_class_arguments(cls, section, sub_configs=False)
    return parser


_TOP_DOCS = {  # jsonargparse reads section docstrings itself; the two top-level flags are added by hand
    "output_dir": "Run directory: config.yaml, run_info.json, metrics.jsonl, checkpoints/, final/.",
    "overwrite_output_dir": "Start over in an output_dir holding an earlier run (its dtrain files are removed).",
}


_UNKNOWN_PATTERNS = [
    re.compile(r"unrecognized arguments: (--?[\w.\-]+)"),
    re.compile(r"Group '(\w+)' does not accept option '([\w\-]+)'"),
    re.compile(r"Option '([\w.\-]+)' is not accepted"),
    re.compile(r"Key '([\w.\-]+)' is not expected"),
]

_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "NoneType": "null",
    "str": "a string",
    "list": "a list such as [a, b]",
}


def _expected_value(detail: str) -> str | None:
    """'Expected a <class 'int'>' / 'Expected a typing.Literal[...]' lines -> 'an integer or null'."""
    wants = []
    for m in re.finditer(r"Expected a (?:typing\.Literal\[(.*?)\]|<class '(\w+)'>)", detail):
        if m.group(1) is not None:
            wants.append("one of " + ", ".join(c.strip().strip("'\"") for c in m.group(1).split(",")))
        else:
            wants.append(_TYPE_WORDS.get(m.group(2), m.group(2)))
    return " or ".join(dict.fromkeys(wants)) or None


def _explain(message: str) -> tuple[str, str | None]:
    """A jsonargparse error -> (one line naming the key and the fix, the dotted key or None)."""
    first = message.strip().splitlines()[0] if message.strip() else message
    if 'Parser key "data.sources"' in message:
        return _explain_source(message), "data.sources"
    for pattern in _UNKNOWN_PATTERNS:
        m = pattern.search(message)
        if not m:
            continue
        key = ".".join(m.groups()).lstrip("-")
        if "=" in key:
            key = key.split("=", 1)[0]
        close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
        if not close:  # a misspelt section: match on the field name alone
            tail = key.split(".")[-1]
            close = [k for k in all_keys() if k.endswith("." + tail)][:1]
        hint = (
            f"; did you mean '{close[0]}'?" if close else f"; valid sections: {', '.join(_SECTION_CLASSES)}"
        )
        return f"unknown config key '{key}'{hint}", key
    m = re.search(r'Parser key "([\w.]+)":\s*(.*)', message, re.S)
    if m:
        key, detail = m.group(1), m.group(2)
        given = re.search(r"(?:Given value|Got value): (.*)", detail)
        wanted = _expected_value(detail)
        if given and wanted:
            return f"--{key}: got '{given.group(1).strip()}', expected {wanted}", key
        detail = re.sub(r"<class '(\w+)'>", r"\1", " ".join(detail.split()))
        return f"bad value for '{key}': {detail[:300]}", key
    return " ".join(first.split()), None


def _explain_source(message: str) -> str:
    """A data.sources entry the parser refused (jsonargparse nests the entry's own error)."""
    keys = ", ".join(f.name for f in fields(SourceConfig))
    inner = re.search(r'Parser key "(\w+)":\s*(.*)', message.split('Parser key "data.sources"', 1)[1], re.S)
    if inner:
        given = re.search(r"(?:Given value|Got value): (.*)", inner.group(2))
        wanted = _expected_value(inner.group(2))
        got = f"got '{given.group(1).strip()}'" if given else "bad value"
        wanted = (wanted or "another value").replace(" or null", "")
        return f"--data.sources: a source's {inner.group(1)} {got}, expected {wanted}"
    unknown = re.search(r"Option '([\w\-]+)' is not accepted", message)
    if unknown:
        close = difflib.get_close_matches(unknown.group(1), [f.name for f in fields(SourceConfig)], n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"--data.sources: unknown key '{unknown.group(1)}' in a source; {hint}(a source has: {keys})"
    if "required: path" in message:
        return "--data.sources: every source needs a path (a file, a directory, a saved dataset or a hub id)"
    return (
        "--data.sources: expected a list of sources, each a mapping such as {path: data.jsonl, weight: 1} "
        f"(a source has: {keys})"
    )


def _explain_parse_error(message: str) -> str:
    """Turn a jsonargparse error into one line that names the key and the closest valid one."""
    return _explain(message)[0]


# --------------------------------------------------------------------------------------------
# Recipes (--config FILE) are read here first: jsonargparse would report a YAML problem without
# the file or the line, and PyYAML silently keeps the last of two equal keys.
# --------------------------------------------------------------------------------------------


def _config_files(argv: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _node_text(node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return "empty" if node.tag.endswith(":null") else f"the value '{node.value}'"
    return "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"


def check_recipe(path: str) -> dict[str, int]:
    """Read a --config YAML recipe and refuse what would be misread, naming the file (and the line).

    Returns the line of every dotted key in it (to name the file and line of a bad value later)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--config: file '{path}' does not exist; give a YAML recipe (see dtrain/recipes/)")
    if p.is_dir():
        raise ConfigError(
            f"--config: '{path}' is a directory; give a YAML recipe file (e.g. a run's config.yaml)"
        )
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"--config {path}: cannot be read ({exc.strerror}); check its permissions"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"--config {path} line {line}: not UTF-8 text; re-save the file as UTF-8") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        yaml.safe_load(text)  # what compose accepts but construction rejects (unknown tags...)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        opened = getattr(exc, "context_mark", None)
        if mark is not None and opened is not None and mark.index >= len(text.rstrip()):
            mark = opened  # the file ended inside a bracket or quote: name where it was opened
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or str(exc).splitlines()[0]).split())
        context = getattr(exc, "context", None)
        detail = f"{context}, {problem}" if context else problem
        raise ConfigError(
            f"--config {path}{where}: not valid YAML ({detail}); fix the syntax: a recipe maps sections to "
            "indented keys, e.g. 'train:' then '  max_steps: 50'"
        ) from None
    if root is None:
        raise ConfigError(
            f"--config {path}: the file is empty; a recipe maps sections (model, data, train, ...) to their keys"
        )
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(
            f"--config {path}: the top level is {_node_text(root)}, not a mapping; a recipe maps sections "
            "(model, data, train, ...) to their keys, e.g. 'train:' then '  max_steps: 50'"
        )
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            line = key_node.start_mark.line + 1
            name = prefix + str(key)
            if key in seen and key != "<<":
                raise ConfigError(
                    f"--config {path}: key '{name}' is given twice (lines {seen[key]} and {line}); YAML would "
                    "silently keep the last one: delete one of them"
                )
            seen[key] = line
            lines[name] = line
            if not prefix and key in _SECTION_CLASSES and not isinstance(value_node, yaml.MappingNode):
                raise ConfigError(
                    f"--config {path} line {line}: section '{key}' is {_node_text(value_node)}; it must hold "
                    f"{key}.* keys as indented 'name: value' lines under '{key}:' (or delete the line)"
                )
            if isinstance(value_node, yaml.MappingNode):
                walk(value_node, name + ".")

    walk(root, "")
    return lines


def _recipe_lines(argv: list[str]) -> dict[str, tuple[str, int]]:
    """dotted key -> (recipe file, line), over every --config (later files win, as in parsing)."""
    where: dict[str, tuple[str, int]] = {}
    for path in _config_files(argv):
        if not Path(path).expanduser().exists() and any(c in path for c in ":{\n"):
            continue  # an inline YAML string (jsonargparse accepts those): left to the parser
        for key, line in check_recipe(path).items():
            where[key] = (path, line)
    return where


def _given_on_command_line(key: str, argv: list[str]) -> bool:
    flag = f"--{key}"
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def parse_config(argv: list[str] | None = None) -> Config:
    """Parse recipe + overrides into a validated Config. Raises ConfigError (one line) on any problem.

    `--print_config` prints the resolved YAML and exits 0 (after validation).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    print_config = False
    if "--print_config" in argv:
        argv.remove("--print_config")
        print_config = True
    where = _recipe_lines(argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit:  # --help
        raise
    except Exception as exc:  # argparse.ArgumentError and the rest: a bad key or value
        message, key = _explain(str(exc))
        if key is not None and key in where and not _given_on_command_line(key, argv):
            path, line = where[key]
            message = f"--config {path} line {line}: {message}"
        raise ConfigError(message) from None
    cfg = Config(
        output_dir=ns.output_dir,
        overwrite_output_dir=ns.overwrite_output_dir,
        **{section: cls(**vars(ns[section])) for section, cls in _SECTION_CLASSES.items()},
    )
    if cfg.data.sources:  # jsonargparse hands nested dataclasses over as namespaces
        cfg.data.sources = [s if is_dataclass(s) else SourceConfig(**vars(s)) for s in cfg.data.sources]
    problems = validate(cfg)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    if print_config:
        print(cfg.to_yaml(), end="")
        raise SystemExit(0)
    return cfg


def load_config_file(path: str | os.PathLike) -> Config:
    """Read a saved config.yaml (e.g. next to a checkpoint) through the same parser."""
    return parse_config(["--config", str(path)])


# --------------------------------------------------------------------------------------------
# Validation: every cross-field problem is collected and reported at once, before anything loads.
# --------------------------------------------------------------------------------------------

_LOCAL_PREFIXES = (".", "/", "~")


_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def looks_local(path: str) -> bool:
    """A path the user clearly meant as local (hub ids look like `org/name`, with no data-file suffix)."""
    return (
        path.startswith(_LOCAL_PREFIXES)
        or path.count("/") > 1
        or path.lower().endswith(_DATA_SUFFIXES)
        or (os.sep != "/" and os.sep in path)
    )


def source_name(path: str) -> str:
    """A source's default name: the file's stem, a directory's name, or a hub id's last part."""
    p = Path(path.rstrip("/\\"))
    return p.stem if p.suffix.lower() in _DATA_SUFFIXES else p.name


def resolved_sources(d: DataConfig) -> list[SourceConfig]:
    """data.sources (or the data.path shorthand) with every null filled from the data section: the one
    place those fallbacks live. Empty for the embedded synthetic data."""
    from dataclasses import replace

    if d.sources:
        given = d.sources
    elif d.path is not None:
        given = [SourceConfig(path=d.path, eval_path=d.eval_path)]
    else:
        return []
    out = []
    for s in given:
        s = s if is_dataclass(s) else SourceConfig(**(s if isinstance(s, dict) else vars(s)))
        out.append(
            replace(
                s,
                name=s.name or source_name(s.path),
                template=s.template or d.template,
                text_column=s.text_column or d.text_column,
                messages_column=s.messages_column or d.messages_column,
                chat_template=s.chat_template if s.chat_template is not None else d.chat_template,
                split=s.split or d.split,
                eval_fraction=d.eval_fraction if s.eval_fraction is None else s.eval_fraction,
            )
        )
    return out


def _check_sources(d: DataConfig, p: list[str]) -> None:
    if d.sources and (d.path is not None or d.eval_path is not None):
        which = "--data.path" if d.path is not None else "--data.eval_path"
        p.append(
            f"{which} and --data.sources both name train data; list every source under data.sources (a "
            "source's held-out data is its eval_path) and remove data.path/data.eval_path"
        )
        return
    if d.sources is not None and not d.sources:
        p.append("--data.sources is an empty list; list at least one source, or set it to null")
        return
    seen: dict[str, str] = {}
    for i, s in enumerate(resolved_sources(d)):
        where = f"--data.sources[{i}]" if d.sources else "--data.path"
        assert s.name is not None and s.eval_fraction is not None  # filled in by resolved_sources
        if not (isinstance(s.weight, (int, float)) and s.weight > 0) or s.weight != s.weight:
            p.append(f"{where}.weight must be a number > 0 (got {s.weight}); a weight is the source's share")
        if s.name in seen:
            p.append(
                f"{where}: two sources are named '{s.name}' ({seen[s.name]} and {s.path}); give one of them "
                f"another name (e.g. name: {s.name}_2)"
            )
        seen[s.name] = s.path
        if not 0.0 <= s.eval_fraction < 1.0:
            p.append(f"{where}.eval_fraction must be in [0, 1) (got {s.eval_fraction})")
        names = [("path", s.path), ("eval_path", s.eval_path)] if d.sources else []
        for field_name, value in names:
            if value and looks_local(value) and not Path(value).expanduser().exists():
                p.append(
                    f"{where}.{field_name}: '{value}' does not exist; give a json/jsonl/csv/parquet file, a "
                    "directory of them, a saved dataset dir or a hub dataset name"
                )
        if d.sources and s.chat_template and not Path(s.chat_template).expanduser().is_file():
            p.append(
                f"{where}.chat_template: file '{s.chat_template}' does not exist; give a Jinja chat template file"
            )
    if d.prepared is not None:
        prepared = Path(d.prepared).expanduser()
        if not prepared.is_dir():
            p.append(
                f"--data.prepared: '{d.prepared}' is not a directory; give the OUT_DIR that `dtrain prepare` wrote"
            )


def profile_range(text: str) -> tuple[int, int] | None:
    """'3-4' -> (3, 4), '5' -> (5, 5); None when it is not a range of steps from 1 on."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    if not m:
        return None
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    return (first, last) if 1 <= first <= last else None


def validate(cfg: Config) -> list[str]:
    p: list[str] = []
    t, o, d, e, c, lg, m = cfg.train, cfg.optim, cfg.data, cfg.eval, cfg.checkpoint, cfg.log, cfg.model

    def positive(name: str, value, allow_zero: bool = False) -> None:
        if value is None:
            return
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            p.append(f"--{name} must be {bound} (got {value})")

    positive("train.per_device_batch_size", t.per_device_batch_size)
    positive("train.gradient_accumulation_steps", t.gradient_accumulation_steps)
    positive("train.max_steps", t.max_steps)
    positive("train.num_epochs", t.num_epochs)
    positive("train.max_grad_norm", t.max_grad_norm, allow_zero=True)
    positive("train.loss_chunk_size", t.loss_chunk_size, allow_zero=True)
    positive("train.max_nonfinite_steps", t.max_nonfinite_steps)
    positive("peft.r", cfg.peft.r)
    positive("peft.alpha", cfg.peft.alpha)
    if not 0 <= cfg.peft.dropout < 1:
        p.append(f"--peft.dropout must be in [0, 1) (got {cfg.peft.dropout})")
    if cfg.peft.method == "qlora" and m.name_or_path is None:
        p.append(
            "--peft.method qlora loads a pretrained base in 4-bit: set --model.name_or_path (the embedded "
            "model is built in memory, with no weights to quantise; use --peft.method lora for it)"
        )
    positive("train.collective_timeout_s", t.collective_timeout_s)
    positive("data.max_length", d.max_length)
    positive("data.num_workers", d.num_workers, allow_zero=True)
    positive("data.num_proc", d.num_proc)
    positive("data.prepare_timeout_s", d.prepare_timeout_s)
    _check_sources(d, p)
    positive("data.synthetic_train_examples", d.synthetic_train_examples)
    positive("data.synthetic_eval_examples", d.synthetic_eval_examples)
    positive("optim.lr", o.lr)
    positive("optim.head_lr", o.head_lr)
    positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    positive("optim.num_cycles", o.num_cycles)
    positive("eval.steps", e.steps, allow_zero=True)
    positive("eval.batch_size", e.batch_size)
    positive("eval.num_generate", e.num_generate, allow_zero=True)
    positive("eval.max_new_tokens", e.max_new_tokens)
    positive("eval.early_stopping_patience", e.early_stopping_patience, allow_zero=True)
    positive("eval.num_samples", e.num_samples, allow_zero=True)
    positive("checkpoint.save_steps", c.save_steps, allow_zero=True)
    positive("checkpoint.keep_last", c.keep_last)
    positive("checkpoint.keep_every", c.keep_every, allow_zero=True)
    positive("log.every_steps", lg.every_steps)
    if lg.profile_steps is not None and profile_range(lg.profile_steps) is None:
        p.append(
            f"--log.profile_steps must be a step or a range of optimizer steps like 3-4, first >= 1 "
            f"(got '{lg.profile_steps}')"
        )

    if t.max_steps is None and t.num_epochs is None:
        p.append("set one of --train.max_steps or --train.num_epochs")
    if t.max_steps is not None and t.num_epochs is not None:
        p.append("can't use both --train.max_steps and --train.num_epochs; set one to null")
    for name, ratio in (("optim.warmup_ratio", o.warmup_ratio), ("optim.min_lr_ratio", o.min_lr_ratio)):
        if not 0.0 <= ratio < 1.0:
            p.append(f"--{name} must be in [0, 1) (got {ratio})")
    if not 0.0 < o.decay_fraction <= 1.0:
        p.append(f"--optim.decay_fraction must be in (0, 1] (got {o.decay_fraction})")
    if not 0.0 <= d.eval_fraction < 1.0:
        p.append(f"--data.eval_fraction must be in [0, 1) (got {d.eval_fraction}); 0 holds nothing out")
    if t.max_steps is not None and o.warmup_steps is not None and o.warmup_steps >= t.max_steps:
        p.append(f"--optim.warmup_steps ({o.warmup_steps}) must be < --train.max_steps ({t.max_steps})")
    templates = {s.template for s in resolved_sources(d)} or {d.template}
    if templates == {"text"} and e.metric == "exact_match":
        p.append(
            "--eval.metric exact_match needs references; the text template has none: use --eval.metric loss"
        )
    if e.metric == "exact_match" and e.num_generate == 0:
        p.append("--eval.metric exact_match needs --eval.num_generate > 0")
    if e.early_stopping_patience and not e.steps:
        p.append("--eval.early_stopping_patience needs periodic eval: set --eval.steps > 0")
    if m.name_or_path is None:
        if m.num_heads and m.hidden_size % m.num_heads:
            p.append(
                f"--model.hidden_size ({m.hidden_size}) must be divisible by --model.num_heads ({m.num_heads})"
            )
        for task in d.synthetic_tasks:
            if task not in SYNTHETIC_TASKS:
                p.append(
                    f"--data.synthetic_tasks: unknown task '{task}' (choose from {', '.join(SYNTHETIC_TASKS)})"
                )
        if d.path is None and not d.sources and d.prepared is None and d.template == "text":
            p.append(
                "the embedded synthetic data has chat and alpaca columns, no text: use --data.template chat or alpaca"
            )
    elif m.name_or_path and looks_local(m.name_or_path) and not Path(m.name_or_path).expanduser().exists():
        p.append(
            f"--model.name_or_path: directory '{m.name_or_path}' does not exist; give a local model dir or a hub id"
        )
    elif m.name_or_path and Path(m.name_or_path).expanduser().is_file():
        p.append(
            f"--model.name_or_path: '{m.name_or_path}' is a file; give the model directory (the one holding "
            "config.json and the weights)"
        )
    elif (
        m.name_or_path
        and Path(m.name_or_path).expanduser().is_dir()
        and not (Path(m.name_or_path).expanduser() / "config.json").is_file()
    ):
        p.append(
            f"--model.name_or_path: directory '{m.name_or_path}' has no config.json, so it is not a Hugging "
            "Face model directory; give the directory save_pretrained wrote (config.json and the weights)"
        )
    if m.tokenizer and looks_local(m.tokenizer) and not Path(m.tokenizer).expanduser().exists():
        p.append(f"--model.tokenizer: '{m.tokenizer}' does not exist")
    for name, value in (("data.path", d.path), ("data.eval_path", d.eval_path)):
        if value and looks_local(value) and not Path(value).expanduser().exists():
            p.append(
                f"--{name}: file '{value}' does not exist; give a json/jsonl/csv/parquet file, a saved dataset dir or a hub dataset name"
            )
        elif value and Path(value).expanduser().is_file() and not value.lower().endswith(_DATA_SUFFIXES):
            p.append(
                f"--{name}: unsupported file type '{Path(value).suffix or Path(value).name}' ({value}); use a "
                ".json, .jsonl, .csv or .parquet file, or a datasets save_to_disk directory"
            )
    if d.chat_template and not Path(d.chat_template).expanduser().is_file():
        p.append(
            f"--data.chat_template: file '{d.chat_template}' does not exist; give a Jinja chat template file"
        )
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        p.append(
            f"--output_dir: '{cfg.output_dir}' is an existing file, not a directory; choose another --output_dir"
        )
    if m.name_or_path is not None and d.path is None and not d.sources and d.prepared is None:
        p.append(
            "--data.path (or data.sources, or --data.prepared) is required with --model.name_or_path (the "
            "embedded data needs the embedded tokenizer)"
        )
    if c.resume not in ("auto", "never") and not Path(c.resume).expanduser().is_dir():
        p.append(f"--checkpoint.resume: '{c.resume}' is not auto, never or an existing checkpoint directory")
    return p


# Kept here (not in tasks.py) so validation needs no import of the task generators.
SYNTHETIC_TASKS = ("reverse", "sort", "add", "upper", "copy")


def flatten(obj, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; for trackers, which want flat scalars."""
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return out

"""Tokenizer and model: the embedded tiny Llama or any AutoModelForCausalLM; the token-sum loss.

No distributed code here: parallelism is applied from outside by `accelerator.prepare`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dtrain.config import DataConfig, EvalConfig, ModelConfig, UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_error(what: str, name: str, exc: Exception) -> UserError:
    reason = " ".join(str(exc).split())[:300]
    path = Path(name).expanduser()
    hint = (
        ""
        if path.exists()
        else " (not a local directory; no hub access? set HF_HUB_OFFLINE=1 and use a local copy)"
    )
    broken = _unreadable_weights(path) if path.is_dir() else None
    if broken:
        return UserError(
            f"--model.{what}: weights file {broken} is truncated or corrupt ({reason}); copy or save the model "
            "again (save_pretrained), then rerun"
        )
    return UserError(f"--model.{what}: could not load '{name}'{hint}: {reason}")


def _unreadable_weights(model_dir: Path) -> Path | None:
    """The first safetensors file in a model directory whose header or size does not hold up."""
    from safetensors import safe_open

    for f in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 (a safetensors handle is not iterable); reading every tensor finds a short file
                    fh.get_tensor(key)
        except Exception:
            return f
    return None


def build_tokenizer(cfg: ModelConfig):
    name = cfg.tokenizer or cfg.name_or_path
    if name is None:
        from dtrain.tasks import build_char_tokenizer

        return build_char_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:
        raise _load_error("tokenizer" if cfg.tokenizer else "name_or_path", name, exc) from None
    if tok.pad_token is None:  # common for base models. Padding is found by position, never by id (labels
        # are -100 there and batches are right-padded), so any token serves: EOS, else UNK, else token 0
        tok.pad_token = tok.eos_token or tok.unk_token or tok.convert_ids_to_tokens(0)
    return tok


def build_model(
    cfg: ModelConfig,
    tokenizer,
    data: DataConfig,
    eval_cfg: EvalConfig,
    longest: int | None = None,
    quantization=None,
    device_map=None,
):
    """The embedded tiny Llama or the pretrained model; `quantization` (QLoRA's BitsAndBytesConfig) loads
    the pretrained weights in 4-bit."""
    if cfg.name_or_path is None:
        from transformers import LlamaForCausalLM

        config = embedded_config(cfg, tokenizer, data, eval_cfg)
        # transformers wraps `to` with functools.wraps, which mypy then reads as unbound (self = the dtype)
        model = LlamaForCausalLM(config).to(_DTYPES[cfg.dtype])  # type: ignore[arg-type]
    else:
        from transformers import AutoModelForCausalLM

        kwargs = {"dtype": _DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        if quantization is not None:
            kwargs.update(quantization_config=quantization, device_map=device_map)
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
        except Exception as exc:
            if quantization is not None and Path(cfg.name_or_path).expanduser().is_dir():
                reason = " ".join(str(exc).split())[:300]
                raise UserError(
                    f"--peft.method qlora: could not load '{cfg.name_or_path}' in 4-bit: {reason}"
                ) from None
            raise _load_error("name_or_path", cfg.name_or_path, exc) from None
        check_vocabulary(cfg, model, tokenizer)
    check_max_length(cfg, model, data, longest)
    gen = model.generation_config
    gen.do_sample, gen.max_new_tokens = False, eval_cfg.max_new_tokens
    gen.pad_token_id, gen.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if gen.bos_token_id is None:
        gen.bos_token_id = tokenizer.bos_token_id
    for key in ("temperature", "top_p", "top_k"):  # sampling settings contradict greedy decoding
        setattr(gen, key, None)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def embedded_config(cfg: ModelConfig, tokenizer, data: DataConfig, eval_cfg: EvalConfig):
    """The embedded tiny Llama's config (the planner sizes the model from it without building it)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(512, data.max_length + eval_cfg.max_new_tokens),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    if cfg.attn_implementation:
        config._attn_implementation = cfg.attn_implementation
    return config


def check_vocabulary(cfg: ModelConfig, model, tokenizer) -> None:
    """A tokenizer with more tokens than the model has embedding rows: ids past the end would index out
    of range, so it is a mismatch (the wrong --model.tokenizer, or a tokenizer of another checkpoint)
    unless tokens were added on purpose (--model.resize_embeddings, which grows embedding and head).
    A smaller tokenizer is normal: checkpoints pad their embedding to a multiple of 64 or 128."""
    vocab, rows = len(tokenizer), model.get_input_embeddings().num_embeddings  # an int even under ZeRO-3
    if vocab <= rows:
        return
    if cfg.resize_embeddings:
        model.resize_token_embeddings(vocab)
        return
    source = (
        f"--model.tokenizer '{cfg.tokenizer}'"
        if cfg.tokenizer
        else f"the tokenizer of --model.name_or_path '{cfg.name_or_path}'"
    )
    raise UserError(
        f"{source} has {vocab} tokens but the model of --model.name_or_path '{cfg.name_or_path}' has "
        f"{rows} embedding rows: a tokenizer/model mismatch; use the tokenizer saved with the model, or pass "
        "--model.resize_embeddings true if the extra tokens were added on purpose"
    )


def position_limit(config) -> tuple[str, int] | None:
    """(config field, value) of the model's fixed limit on sequence length, None when it has none. GPT-2's
    n_positions answers to max_position_embeddings too (transformers' attribute_map)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def max_positions(config) -> int | None:
    limit = position_limit(config)
    return limit[1] if limit else None


def check_max_length(cfg: ModelConfig, model, data: DataConfig, longest: int | None = None) -> None:
    """Examples longer than the model's positions fail mid-run (learned positions index out of range) or
    train on positions the model never saw: refused before training. `longest`: the longest tokenized
    example, when known (a max_length above the limit is harmless while no example reaches it)."""
    limit = position_limit(model.config)
    needed = min(data.max_length, longest) if longest else data.max_length
    if limit is not None and needed > limit[1]:
        key, value = limit
        raise UserError(
            f"--data.max_length {data.max_length} is larger than the model's {key} {value} "
            f"({type(model).__name__} from --model.name_or_path '{cfg.name_or_path}'; the longest example "
            f"has {needed} tokens); set --data.max_length {value} or less"
        )


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters of the whole model (or those that train), counted right under every profile: ZeRO-3
    partitions report 0 local elements but carry the full count as `ds_numel`; FSDP2 DTensor shards report
    their global size; meta tensors have a shape. Tied weights (one tensor under two names) count once."""
    return sum(
        getattr(p, "ds_numel", None) or p.numel()
        for p in model.parameters()
        if p.requires_grad or not trainable_only
    )


_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "module.")


def clean_name(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (DDP, FSDP, activation checkpointing, compile)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def model_identity(model) -> dict:
    """What makes a checkpoint's weights this model's: class, vocabulary rows, parameter count, and a hash
    of every parameter's name and shape (wrapper prefixes removed; ZeRO-3's `ds_shape`), for the marker."""
    import hashlib

    lines = []
    for name, p in model.named_parameters(remove_duplicate=False):
        lines.append(f"{clean_name(name)} {tuple(getattr(p, 'ds_shape', p.shape))}")
    return {
        "architecture": type(model).__name__,
        "vocab_size": model.get_input_embeddings().num_embeddings,
        "parameters": count_parameters(model),
        "names_sha256": hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest(),
    }


def attn_implementation(model) -> str | None:
    """The attention kernel the model really uses (transformers may pick it when none was asked for)."""
    return getattr(model.config, "_attn_implementation", None)


def flops_per_token(model, num_params: int, seq_len: int) -> float | None:
    """Training FLOPs per token, as torchtitan counts them: 6 x (parameters - input-embedding parameters)
    for the matmuls forward and backward, plus 12 x layers x heads x head_dim x sequence length for
    attention. None when the config does not say its shape."""
    c = model.config
    layers, heads = getattr(c, "num_hidden_layers", None), getattr(c, "num_attention_heads", None)
    hidden = getattr(c, "hidden_size", None)
    if not (layers and heads and hidden):
        return None
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    embedding = count_parameters(model.get_input_embeddings())
    return 6 * (num_params - embedding) + 12 * layers * heads * head_dim * seq_len

"""Tokenizer and model: the embedded tiny Llama or any AutoModelForCausalLM; the token-sum loss.

No distributed code here: parallelism is applied from outside by `accelerator.prepare`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dtrain.config import DataConfig, EvalConfig, ModelConfig, UserError
from dtrain.data import IGNORE_INDEX

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_error(what: str, name: str, exc: Exception) -> UserError:
    reason = " ".join(str(exc).split())[:300]
    hint = (
        ""
        if Path(name).expanduser().exists()
        else " (not a local directory; no hub access? set HF_HUB_OFFLINE=1 and use a local copy)"
    )
    return UserError(f"--model.{what}: could not load '{name}'{hint}: {reason}")


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
    if tok.pad_token is None:  # common for base models; pad rows never count (labels are -100 there)
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def build_model(cfg: ModelConfig, tokenizer, data: DataConfig, eval_cfg: EvalConfig):
    if cfg.name_or_path is None:
        from transformers import LlamaConfig, LlamaForCausalLM

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
        model = LlamaForCausalLM(config).to(_DTYPES[cfg.dtype])
    else:
        from transformers import AutoModelForCausalLM

        kwargs = {"dtype": _DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
        except Exception as exc:
            raise _load_error("name_or_path", cfg.name_or_path, exc) from None
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
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


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of the whole model, counted right under every profile: ZeRO-3 partitions report 0 local
    elements but carry the full count as `ds_numel`; FSDP2 DTensor shards report their global size; meta
    tensors have a shape. Tied weights (one tensor under two names) count once."""
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over target tokens (labels != -100), in fp32.

    A sum, not a mean: the caller divides by the number of target tokens of the whole
    accumulation window over all ranks, so every token weighs the same however the tokens fall
    into micro-batches and ranks.
    """
    logits = logits[:, :-1, :].float()
    targets = labels[:, 1:].to(logits.device)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Target tokens in a batch as a device tensor (no host sync)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()

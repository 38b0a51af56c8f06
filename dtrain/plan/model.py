"""The model as the planner sees it: sizes and shapes from its config alone, built on the meta device.

No weight is read or downloaded: a pretrained directory (or hub id) gives its `config.json`, the embedded
model its schema settings. Building on the meta device costs no memory whatever the model's size, and
gives every parameter's shape: the counts below are exact, not formulas over hidden sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dtrain.config import Config, UserError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BYTES = (
    0.5 + 1 / 64 + 4 / (64 * 256)
)  # 4-bit codes, uint8 absmax per 64, fp32 per 256 absmax (double quant)


@dataclass
class ModelShape:
    """What the memory formulas need, counted from the meta-device model."""

    architecture: str
    config: object  # the transformers config (activations are measured on a model built from it)
    params: int  # every parameter, tied weights once
    trainable: int  # those the optimizer updates: all of them, or the adapters (and modules_to_save)
    linear: int  # in the decoder's linear layers: what autocast copies, what QLoRA quantises
    embedding: int  # input embedding (and an untied head)
    layers: int
    hidden: int
    vocab: int
    largest_unit: int  # parameters of the largest decoder layer: what FSDP/ZeRO-3 gather at once
    weight_bytes: float  # bytes of the weights as loaded (QLoRA: 4-bit linear layers at their real size)
    dtype_bytes: int  # bytes per element of --model.dtype (the unquantised weights, their gradients)
    trainable_shapes: list[tuple[int, ...]] = field(default_factory=list)  # for factored optimizer states
    quantized: bool = False


def model_config(cfg: Config):
    """The transformers config of the run's model: the embedded Llama's, or the pretrained one's."""
    if cfg.model.name_or_path is None:
        from dtrain.modeling import build_tokenizer, embedded_config

        return embedded_config(cfg.model, build_tokenizer(cfg.model), cfg.data, cfg.eval)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code
        )
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300]
        raise UserError(
            f"--model.name_or_path: could not read the config of '{cfg.model.name_or_path}': {reason}"
        ) from None
    if cfg.model.attn_implementation:
        config._attn_implementation = cfg.model.attn_implementation
    return config


def meta_model(config, dtype: torch.dtype = torch.float32):
    """The model with every parameter on the meta device (no memory, no initialisation cost)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated decoder layers: the modules of the model's `_no_split_modules` classes (what FSDP wraps),
    else the longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists: list[torch.nn.ModuleList] = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    longest = max(lists, key=lambda m: len(list(m.children())), default=None)
    return list(longest.children()) if longest is not None else []


def shape_of(cfg: Config) -> ModelShape:
    config = model_config(cfg)
    model = meta_model(config)
    architecture = type(model).__name__
    if cfg.peft.method != "none":
        model = _with_adapters(model, cfg)
    params = list({id(p): p for p in model.parameters()}.values())  # tied weights once
    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    linear = sum(_linear_weights(layer) for layer in layers)
    embedding_module = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embedding = embedding_module.weight.numel()
    if head is not None and head.weight is not embedding_module.weight:
        embedding += head.weight.numel()
    trainable = [p for p in params if p.requires_grad]
    total = sum(p.numel() for p in params)
    dtype_bytes = DTYPE_BYTES[cfg.model.dtype]
    quantized = cfg.peft.method == "qlora"
    if quantized:  # decoder linear layers in NF4; embeddings, head, norms and adapters unquantised
        base_linear = linear - _adapter_params(layers)
        weight_bytes = base_linear * NF4_BYTES + (total - base_linear) * dtype_bytes
    else:
        weight_bytes = float(total * dtype_bytes)
    return ModelShape(
        architecture=architecture,
        config=config,
        params=total,
        trainable=sum(p.numel() for p in trainable),
        linear=linear,
        embedding=embedding,
        layers=len(layers),
        hidden=int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0),
        vocab=embedding_module.weight.shape[0],
        largest_unit=max(
            (sum(p.numel() for p in layer.parameters() if id(p) in in_layers) for layer in layers),
            default=total,
        ),
        weight_bytes=weight_bytes,
        dtype_bytes=dtype_bytes,
        trainable_shapes=[tuple(p.shape) for p in trainable],
        quantized=quantized,
    )


def _linear_weights(layer: torch.nn.Module) -> int:
    """Elements of a layer's matmul weights (nn.Linear, and GPT-2's Conv1D)."""
    total = 0
    for m in layer.modules():
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
            weight = m.weight
            assert isinstance(weight, torch.Tensor)
            total += weight.numel()
    return total


def _adapter_params(layers) -> int:
    return sum(p.numel() for layer in layers for n, p in layer.named_parameters() if "lora_" in n)


def _with_adapters(model, cfg: Config):
    """LoRA adapters on the meta model, as `dtrain.peft.add_adapters` adds them (same targets)."""
    from dtrain.peft import _peft, lora_config

    peft = _peft(cfg.peft.method)
    try:
        return peft.get_peft_model(model, lora_config(cfg.peft))
    except ValueError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"--peft.target_modules / --peft.modules_to_save: {reason}") from None

"""Optimizer and learning-rate schedule.

Parameter groups: weight decay only on matrices (never biases, norm weights or other 1-D
tensors); the output head may get its own learning rate. Schedules are transformers' formulas in a
`torch.optim.lr_scheduler.LambdaLR` (the object `transformers.get_scheduler` returns, so checkpoints are
interchangeable), sized in optimizer steps. Not `get_scheduler` itself: its module imports
`transformers.trainer_utils`, which imports peft and bitsandbytes when installed, 2.2 s of an 11 s smoke
run on the 2-core machine, in every process; tests/test_optim.py checks every schedule step by step
against it.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from dtrain.config import OptimConfig, UserError


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    # Hugging Face models have these methods; any other module may lack them
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    head_ids = {id(p) for p in head.parameters()} if head is not None and cfg.head_lr is not None else set()
    get_input = getattr(model, "get_input_embeddings", None)
    input_ids_ = {id(p) for p in get_input().parameters()} if get_input is not None else set()
    groups: dict[tuple[bool, bool], list] = {}
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        # A tied head is the input embedding: it keeps the base lr (changing it would move both).
        is_head = id(p) in head_ids and id(p) not in input_ids_
        # ZeRO-3 partitions are flat 1-D tensors: ds_shape is the real shape
        decay = len(getattr(p, "ds_shape", p.shape)) >= 2
        groups.setdefault((is_head, decay), []).append(p)
    out = []
    for (is_head, decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "lr": cfg.head_lr if is_head else cfg.lr,
                "name": ("head" if is_head else "body") + ("" if decay else "_no_decay"),
            }
        )
    return out


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(
            "--optim.name 8-bit optimizers need bitsandbytes: pip install 'dtrain[bnb]'"
        ) from None
    return bitsandbytes.optim


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "adamw":
        # fused on CUDA (one kernel for all params); foreach elsewhere (torch's default).
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=device.type == "cuda" or None
        )
    if cfg.name == "adamw_8bit":
        return _bnb().AdamW8bit(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    if cfg.name == "paged_adamw_8bit":
        return _bnb().PagedAdamW8bit(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    if cfg.name == "adamw_8bit_ao":
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            raise UserError(
                "--optim.name adamw_8bit_ao needs torchao: pip install 'dtrain[torchao]'"
            ) from None
        return AdamW8bit(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    if cfg.name == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.beta1)
    raise UserError(f"--optim.name: unknown optimizer '{cfg.name}'")


def warmup_steps(cfg: OptimConfig, max_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return math.ceil(cfg.warmup_ratio * max_steps)


def lr_factor(
    step: int, *, kind: str, warmup: int, total: int, min_ratio: float, cycles: int, stable: int, decay: int
) -> float:
    """The multiple of the peak learning rate at optimizer step `step`, as transformers computes it
    (cosine: half a wave to min_ratio; wsd: linear warmup from min_ratio, stable, half-cosine decay)."""
    ramp = float(step) / float(max(1, warmup))
    if kind == "wsd":
        if step < warmup:
            return max(0.0, ramp * (1.0 - min_ratio) + min_ratio)
        if step < warmup + stable:
            return 1.0
        if step < warmup + stable + decay:
            progress = float(step - warmup - stable) / float(max(1, decay))
            return max(
                0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)) * (1.0 - min_ratio) + min_ratio
            )
        return min_ratio
    if step < warmup:
        return ramp
    if kind == "constant_with_warmup":
        return 1.0
    if kind == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    progress = float(step - warmup) / float(max(1, total - warmup))
    if kind == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * progress) % 1.0))))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)) * (1 - min_ratio) + min_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    warmup = warmup_steps(cfg, max_steps)
    # wsd: never longer than what warmup leaves, so the schedule always ends at min_lr_ratio
    decay = min(max(1, round(cfg.decay_fraction * max_steps)), max(1, max_steps - warmup))
    factor = partial(
        lr_factor,
        kind=cfg.scheduler,
        warmup=warmup,
        total=max_steps,
        min_ratio=cfg.min_lr_ratio,
        cycles=cfg.num_cycles,
        stable=max(0, max_steps - warmup - decay),
        decay=decay,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _leaf_tensors(value):
    """Plain tensors behind a state value: DTensor shards and tensor subclasses (torchao's 8-bit
    states) are unpacked into the tensors that really hold the bytes."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.to_local()
    if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        for name in names:
            yield from _leaf_tensors(getattr(value, name))
    elif torch.is_tensor(value):
        yield value


def optimizer_state_bytes(optimizer) -> dict[str, int]:
    """Bytes of optimizer state held by this rank, by dtype, read from the live optimizer (under
    Accelerate's and DeepSpeed's wrappers). Proves an 8-bit optimizer really keeps 8-bit state."""
    inner = optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    by_dtype: dict[str, int] = {}
    for state in inner.state.values():
        for value in state.values():
            for t in _leaf_tensors(value):
                key = str(t.dtype).removeprefix("torch.")
                by_dtype[key] = by_dtype.get(key, 0) + t.numel() * t.element_size()
    return by_dtype


def optimizer_state_row(accelerator, optimizer, num_params: int) -> dict:
    """Optimizer-state bytes per parameter over all ranks, logged once: 8 for fp32 Adam, ~2 for 8-bit."""
    by_dtype = optimizer_state_bytes(optimizer)
    dtypes = sorted(by_dtype)
    totals = accelerator.gather_for_metrics([by_dtype], use_gather_object=True)
    merged: dict[str, int] = {}
    for part in totals:
        for key, value in part.items():
            merged[key] = merged.get(key, 0) + value
    replicas = 1 if accelerator.distributed_type.name in ("DEEPSPEED", "FSDP") else accelerator.num_processes
    return {
        "optim_state_bytes_per_param": sum(merged.values()) / replicas / num_params if num_params else None,
        "optim_state_dtypes": ",".join(sorted(set(dtypes) | set(merged))),
    }

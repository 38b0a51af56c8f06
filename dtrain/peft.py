"""Parameter-efficient fine-tuning through the `peft` library: LoRA adapters on a frozen model, and QLoRA,
the same on a base loaded in 4-bit NF4 with double quantisation (bitsandbytes).

The adapters are added before `accelerator.prepare`, so every profile wraps a model whose base is frozen.
Checkpoints then hold only what trains (adapters, `modules_to_save`) and its optimizer state, plus a
reference to the base: its path and a fingerprint, checked before a resume or an export uses it.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

from dtrain.config import Config, PeftConfig, UserError

METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA"}


def enabled(cfg: Config) -> bool:
    return cfg.peft.method != "none"


def _peft(method: str):
    try:
        import peft
    except ImportError:
        raise UserError(
            f"--peft.method {method} needs the peft library: pip install 'dtrain[peft]'"
        ) from None
    return peft


def quantization_config(precision: str | None):
    """4-bit NF4 with double quantisation; the adapters' compute dtype follows the mixed precision."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision or "no", torch.float32)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def qlora_refusal(kind: str) -> str | None:
    """Why QLoRA cannot run under a sharding profile with the installed libraries (kind: single, ddp, fsdp,
    deepspeed), else None. Used by `dtrain launch`'s pre-flight and again in the ranks."""
    if kind == "fsdp":
        return (
            "Accelerate's FSDP2 leaves bitsandbytes' packed uint8 4-bit weights unsharded (every rank would "
            "hold the whole base) and mixes them with sharded tensors"
        )
    if kind == "deepspeed":
        return (
            "DeepSpeed cannot partition bitsandbytes 4-bit weights (ZeRO-3's init, DeepSpeed issue 5660), and "
            "ZeRO-1/2 would shard only the adapters' small optimizer state"
        )
    return None


def check_qlora_support() -> None:
    """bitsandbytes must be importable and have a 4-bit kernel for this machine, before any weight loads."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--peft.method qlora needs bitsandbytes: pip install 'dtrain[bnb]'") from None
    except Exception as exc:  # a build without a kernel for this device
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"--peft.method qlora: bitsandbytes cannot run 4-bit here ({reason})") from None


def lora_config(cfg: PeftConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules or "all-linear",
        modules_to_save=cfg.modules_to_save,
        task_type="CAUSAL_LM",
    )


def load_options(cfg: Config, accelerator) -> dict:
    """Extra arguments for loading the base: QLoRA's 4-bit quantisation, on this rank's own device."""
    if cfg.peft.method != "qlora":
        return {}
    kind = {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(accelerator.distributed_type.name, "ddp")
    refusal = qlora_refusal(kind)
    if refusal:
        raise UserError(
            f"--peft.method qlora cannot run under {kind}: {refusal}; use the ddp or single_gpu profile"
        )
    check_qlora_support()
    options = {"quantization": quantization_config(accelerator.mixed_precision)}
    if accelerator.device.type == "cuda":  # each rank quantises onto its own GPU
        options["device_map"] = {"": accelerator.device.index or 0}
    return options


def add_adapters(model, cfg: Config):
    """The model with LoRA adapters and everything else frozen; unchanged for --peft.method none."""
    method = cfg.peft.method
    if method == "none":
        return model
    peft = _peft(method)
    if method == "qlora":  # norms in fp32, input gradients on, checkpointing as the config says
        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.model.gradient_checkpointing is not False,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    try:
        return peft.get_peft_model(model, lora_config(cfg.peft))
    except ValueError as exc:  # e.g. a target module the model does not have
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"--peft.target_modules / --peft.modules_to_save: {reason}") from None


def summary(model, cfg: Config) -> dict | None:
    """Trainable and total parameters (4-bit weights at their real count) and the resolved targets."""
    if not enabled(cfg):
        return None
    trainable, total = model.get_nb_trainable_parameters()
    targets = sorted({name.rsplit(".", 1)[-1] for name in model.targeted_module_names})
    return {
        "method": cfg.peft.method,
        "r": cfg.peft.r,
        "alpha": cfg.peft.alpha,
        "target_modules": targets,
        "modules_to_save": cfg.peft.modules_to_save,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_fraction": trainable / total,
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
    }


def describe(info: dict) -> str:
    """The start-up line's part: what trains."""
    return (
        f"{METHOD_NAMES[info['method']]} r{info['r']} alpha {info['alpha']} on {','.join(info['target_modules'])}: "
        f"{info['trainable_parameters'] / 1e6:.3f}M of {info['total_parameters'] / 1e6:.2f}M parameters train "
        f"({100 * info['trainable_fraction']:.2f}%)"
    )


# --------------------------------------------------------------------------------------------
# The base a checkpoint's adapters belong to
# --------------------------------------------------------------------------------------------


def base_reference(cfg: Config, model=None) -> dict | None:
    """Where the frozen base comes from and a fingerprint of its weights, without reading all of them: a
    local directory hashes config.json and, per weights file, its name, size and four 64 KiB samples; a
    hub model its commit; the embedded model its shape and seed (it is rebuilt from them)."""
    if not enabled(cfg):
        return None
    name = cfg.model.name_or_path
    h = hashlib.sha256()
    if name is None:
        shape = {
            k: getattr(cfg.model, k) for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size")
        }
        h.update(json.dumps({"embedded": shape, "seed": cfg.train.seed, "dtype": cfg.model.dtype}).encode())
    elif Path(name).expanduser().is_dir():
        root = Path(name).expanduser()
        h.update((root / "config.json").read_bytes() if (root / "config.json").is_file() else b"")
        for f in sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")):
            size = f.stat().st_size
            h.update(f"{f.name} {size}".encode())
            with open(f, "rb") as fh:
                for offset in (0, size // 3, 2 * size // 3, max(size - 65536, 0)):
                    fh.seek(offset)
                    h.update(fh.read(65536))
    else:  # a hub id: the commit transformers resolved it to
        commit = getattr(getattr(model, "config", None), "_commit_hash", None)
        h.update(f"{name}@{commit}".encode())
    return {"name_or_path": name, "fingerprint": h.hexdigest()[:32]}


def load_adapted(ckpt: Path, state_dict: dict, saved_base: dict | None):
    """For `dtrain export`: the run's base (unquantised, in its own dtype) with the checkpoint's adapters
    loaded, after checking that the base is the one they were trained on."""
    from dtrain.checkpoint import CheckpointError
    from dtrain.config import parse_config
    from dtrain.modeling import build_model, build_tokenizer

    cfg = parse_config(["--config", str(ckpt / "config.yaml")])
    if cfg.model.name_or_path is None:  # rebuilt exactly as the run built it: from the seed
        from accelerate.utils import set_seed

        set_seed(cfg.train.seed)
        base = build_model(cfg.model, build_tokenizer(cfg.model), cfg.data, cfg.eval)
    else:
        from transformers import AutoModelForCausalLM

        try:
            with _one_process_load():
                base = AutoModelForCausalLM.from_pretrained(
                    cfg.model.name_or_path, dtype="auto", trust_remote_code=cfg.model.trust_remote_code
                )
        except Exception as exc:
            reason = " ".join(str(exc).split())[:200]
            raise CheckpointError(
                f"checkpoint {ckpt} holds adapters only; its base '{cfg.model.name_or_path}' "
                f"could not be loaded ({reason})"
            ) from None
    now = base_reference(cfg, base)
    assert now is not None  # an adapter run's config: cfg.peft.method is set
    if saved_base and now["fingerprint"] != saved_base["fingerprint"]:
        raise CheckpointError(
            f"checkpoint {ckpt} holds adapters trained on '{saved_base['name_or_path'] or 'the embedded model'}', "
            "whose files have changed since (another fingerprint); restore that base to export these adapters"
        )
    model = _peft(cfg.peft.method).get_peft_model(base, lora_config(cfg.peft))
    model.peft_config["default"].base_model_name_or_path = cfg.model.name_or_path
    unexpected = model.load_state_dict(state_dict, strict=False).unexpected_keys
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state_dict]
    if unexpected or missing:
        raise CheckpointError(
            f"checkpoint {ckpt} does not match its run's adapters: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model


@contextmanager
def _one_process_load():
    """Inside a ZeRO-3 run (its final/ export), transformers would partition a model it loads across the
    ranks (zero.Init) and wait for the others: the export loads for this one process only."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None  # no public switch for this; restored below
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved

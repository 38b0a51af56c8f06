"""`dtrain export CHECKPOINT OUT_DIR`: any dtrain checkpoint to a plain Hugging Face model directory.

    dtrain export runs/sft/checkpoints/step-00001000 models/sft-1000
    dtrain export runs/sft models/sft --dtype bfloat16      # a run dir: its newest complete checkpoint
    dtrain export runs/sft/checkpoints/best models/sft-best

Works offline in one process for every profile: single, DDP and FSDP checkpoints are read from their
torch.distributed.checkpoint shards, DeepSpeed ZeRO 1/2/3 ones through DeepSpeed's fp32 reconstruction.
The weights are the full fp32 master weights unless --dtype casts them. The end-of-training `final/`
directory is written by this same code.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml

from dtrain import quiet
from dtrain.checkpoint import (
    DS_TAG,
    MARKER,
    CheckpointError,
    complete_checkpoints,
    quiet_single_process,
    read_marker,
    verify,
)
from dtrain.cli import Parser
from dtrain.config import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HF_CONFIG_FILES = ("config.json", "generation_config.json")


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint)."""
    if (path / MARKER).is_file():
        return path
    if path.is_dir():
        done = complete_checkpoints(path / "checkpoints")
        if done:
            return done[-1]
    raise CheckpointError(
        f"'{path}' is neither a complete dtrain checkpoint (no {MARKER}) nor a run with one"
    )


def full_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The unsharded model weights, gathered from every rank's shard on disk, without a process group."""
    if read_marker(ckpt).get("format") == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag=DS_TAG))
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(ckpt / "dcp"))
    wanted = {
        key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    with quiet_single_process():
        dcp.load({"model": wanted}, storage_reader=reader, no_dist=True)
    return wanted


def build_model(ckpt: Path, state_dict: dict[str, torch.Tensor]):
    """The architecture from the checkpoint's hf/config.json, holding exactly the saved tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    hf = ckpt / "hf"
    run_cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    trust = bool(run_cfg.get("model", {}).get("trust_remote_code"))
    config = AutoConfig.from_pretrained(hf, trust_remote_code=trust)
    # The class's own constructor, not from_config: inside a ZeRO-3 run from_config would partition this
    # one-process model across the ranks (zero.Init). On meta: no memory for weights replaced at once.
    ref = (getattr(config, "auto_map", None) or {}).get("AutoModelForCausalLM")
    if ref and trust:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        model_class = get_class_from_dynamic_module(ref, str(hf))
    else:
        # transformers annotates its lazy auto mapping's values as pairs; a model mapping's are classes
        model_class = AutoModelForCausalLM._model_mapping[type(config)]  # type: ignore[assignment]
    with torch.device("meta"):
        model = model_class(config)
    unexpected = model.load_state_dict(state_dict, strict=False, assign=True).unexpected_keys
    model.tie_weights()  # a tied head is one tensor again (it may have been saved under both names)
    empty = [name for name, p in model.named_parameters() if p.is_meta]
    if unexpected or empty:
        raise CheckpointError(
            f"checkpoint {ckpt} does not match its hf/config.json: "
            f"missing {empty[:3]}, unexpected {unexpected[:3]}"
        )
    if (hf / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(hf)
    return model


def exported_model(ckpt: Path, adapter_only: bool):
    """The model to save: the checkpoint's full weights, or for an adapter run (--peft.method) its base with
    the adapters merged in (default) or the PEFT adapter model itself (--adapter-only)."""
    marker = read_marker(ckpt)
    base = (marker.get("model") or {}).get("base")
    if (
        base is None
        and yaml.safe_load((ckpt / "config.yaml").read_text()).get("peft", {}).get("method", "none") == "none"
    ):
        if adapter_only:
            raise UserError(
                f"--adapter-only: checkpoint {ckpt} trained every weight (no --peft.method); "
                "export it without --adapter-only"
            )
        return build_model(ckpt, full_state_dict(ckpt))
    from dtrain.peft import load_adapted

    adapted = load_adapted(ckpt, full_state_dict(ckpt), base)
    return adapted if adapter_only else adapted.merge_and_unload()


def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    replace: bool = False,
    adapter_only: bool = False,
) -> Path:
    """Write OUT_DIR atomically (a temporary directory renamed at the end). Returns the checkpoint used."""
    ckpt = find_checkpoint(Path(checkpoint))
    problem = verify(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: {problem}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not replace:
        raise UserError(
            f"OUT_DIR {out_dir} exists and is not empty; pass --overwrite or choose another directory"
        )
    model = exported_model(ckpt, adapter_only)
    if dtype is not None:
        model.to(DTYPES[dtype])
    tmp = out_dir.with_name(out_dir.name + ".tmp-export")
    old = out_dir.with_name(out_dir.name + ".old-export")
    for leftover in (tmp, old):  # from an export that was killed
        if leftover.exists():
            shutil.rmtree(leftover)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    for f in (ckpt / "hf").iterdir():  # tokenizer files
        if f.is_file() and f.name not in HF_CONFIG_FILES:
            shutil.copy2(f, tmp / f.name)
    if out_dir.exists():
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
    return ckpt


def export_final(accelerator, checkpoint: Path, out_dir: Path) -> None:
    """`final/` is the export of the last checkpoint, by the same code as `dtrain export`."""
    if accelerator.is_main_process:
        export_checkpoint(checkpoint, out_dir, replace=True)
    accelerator.wait_for_everyone()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dtrain export", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "checkpoint", type=Path, help="a checkpoint directory (step-..., best) or a run directory"
    )
    parser.add_argument("out_dir", type=Path, help="the Hugging Face model directory to write")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as saved)"
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="split the safetensors above this size, with an index (default 5GB)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty OUT_DIR (after success)"
    )
    parser.add_argument(
        "--adapter-only",
        action="store_true",
        help="for a --peft.method run: write the PEFT adapter directory (PeftModel.from_pretrained) instead of "
        "the base with the adapters merged in",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet.no_weight_bars()
    try:
        ckpt = export_checkpoint(
            args.checkpoint, args.out_dir, args.dtype, args.max_shard_size, args.overwrite, args.adapter_only
        )
    except UserError as exc:
        print(f"dtrain: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"dtrain: exported {ckpt} -> {args.out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    from dtrain.process import exit_with

    exit_with(main())

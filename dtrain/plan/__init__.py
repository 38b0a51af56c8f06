"""`dtrain plan`: the memory per GPU of every launch profile for a recipe, and the one to launch.

    dtrain plan --config my.yaml --gpus 8 --gpu H100
    dtrain plan --config my.yaml --gpus 8 --nodes 2 --gpu-memory 80GiB --json

The model comes from its config alone (meta device and fake tensors: nothing is downloaded or allocated),
the profiles from accelerate_configs/ and ds_configs/. The package follows the estimate: model.py (sizes
and shapes), activations.py (measured saved bytes), memory.py (the parts of one GPU's peak under a
profile), choose.py (the recommendation), report.py (table, footnote, JSON); devices.py reads a GPU's
memory through NVML.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass, replace

from dtrain.cli import Parser
from dtrain.config import Config, UserError, parse_config
from dtrain.plan import devices

PLAN_FLAGS = ("--gpus", "--nodes", "--gpu-memory", "--gpu", "--json", "--calibrate")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dtrain plan",
        description="Estimate every profile's memory per GPU for a recipe and recommend the one to launch; "
        "training flags (--config R, --train.*, --model.*) are read as `dtrain train` reads them.",
        allow_abbrev=False,
    )
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (processes) per node")
    parser.add_argument("--nodes", type=int, default=1, help="machines")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80GiB, 80GB, 81559MiB")
    size.add_argument("--gpu", help=f"a GPU by name: {', '.join(devices.GPUS)}")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="run two real steps of the recommendation on this machine and print estimated / measured peak",
    )
    return parser


def split_plan_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the plan's own flags, the training flags). The training flags may also follow a `--`, as they do
    for `dtrain launch`, so a launch command's flags can be planned as written."""
    args, train_args = build_parser().parse_known_args(argv)
    if "--" in train_args:
        train_args.remove("--")
    if args.gpus < 1 or args.nodes < 1:
        raise UserError(f"--gpus and --nodes must be >= 1 (got {args.gpus} and {args.nodes})")
    return args, train_args


@dataclass
class Device:
    bytes: int
    name: str
    how: str  # given, named, read through NVML, assumed


def device_of(args: argparse.Namespace) -> Device:
    if args.gpu_memory:
        return Device(devices.parse_size(args.gpu_memory), args.gpu_memory, "--gpu-memory")
    if args.gpu:
        return Device(devices.named(args.gpu), args.gpu, "--gpu")
    seen = devices.visible_memory()
    if seen:
        return Device(seen[0], seen[1], "read through NVML")
    return Device(devices.GPUS["H100"], "H100", "assumed (no GPU visible: give --gpu or --gpu-memory)")


def main(argv: list[str] | None = None) -> int:
    args, train_args = split_plan_args(list(sys.argv[1:] if argv is None else argv))
    cfg = parse_config(train_args)
    plan = make_plan(cfg, args.gpus, args.nodes, device_of(args), train_args)
    from dtrain.plan.report import as_json, as_text

    print(json.dumps(as_json(plan), indent=1) if args.json else as_text(plan))
    if args.calibrate:
        from dtrain.plan.calibrate import calibrate

        return calibrate(plan)
    return 0


@dataclass
class Plan:
    cfg: Config
    gpus: int
    nodes: int
    device: Device
    shape: object  # ModelShape
    activations: object  # ActivationModel
    rows: list
    extra_rows: list  # the 8-bit optimizers
    choice: object | None  # Choice
    command: str | None
    advice: str | None  # what would make it fit, when nothing does
    train_args: list[str]
    staging: float | None = None  # --checkpoint.async_save: host bytes per process for the snapshot


def make_plan(cfg: Config, gpus: int, nodes: int, device: Device, train_args: list[str]) -> Plan:
    from dtrain.plan.choose import recommend, what_would_fit
    from dtrain.plan.model import shape_of

    shape = shape_of(cfg)
    acts = activations_of(shape, cfg, cfg.train.mixed_precision or "no")
    per_process = cfg.train.per_device_batch_size * cfg.train.gradient_accumulation_steps
    cands = candidates(cfg, gpus, nodes)
    rows, choice = recommend(shape, acts, cands, per_process, device.bytes, cfg)
    eight_bit = [
        replace(c, setting=replace(c.setting, optimizer=o), refused=refusal(c.name, cfg, gpus, nodes, o))
        for c in cands
        if not c.refused and not c.offloads and cfg.optim.name == "adamw"
        for o in (("adamw_8bit_ao",) if c.setting.kind == "fsdp" else ("adamw_8bit",))
    ]
    extra, _ = recommend(shape, acts, eight_bit, per_process, device.bytes, cfg)
    for row in extra:
        row.optimizer_note = row.candidate.setting.optimizer
    command = launch_command(choice, cfg, gpus, nodes, train_args) if choice else None
    advice = None if choice else what_would_fit(shape, acts, cands, per_process, device.bytes, cfg)
    staging = None
    if choice and cfg.checkpoint.async_save:
        from dtrain.plan.memory import staging_bytes

        staging = staging_bytes(shape, acts, choice.estimate.setting)
    return Plan(
        cfg, gpus, nodes, device, shape, acts, rows, extra, choice, command, advice, train_args, staging
    )


def activations_of(shape, cfg: Config, precision: str):
    """The activations measured in the compute dtype: bf16/fp16 under mixed precision, else the weights'."""
    import torch

    from dtrain.plan.activations import measure

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, getattr(torch, cfg.model.dtype))
    return measure(shape.config, compute, cfg.data.max_length)


def refusal(
    profile_name: str, cfg: Config, gpus: int, nodes: int, optimizer: str | None = None
) -> str | None:
    """Why `dtrain launch` would refuse this profile for this recipe (its own pre-flight), else None."""
    from dtrain.launch import load_profile, preflight

    if optimizer:
        cfg = replace(cfg, optim=replace(cfg.optim, name=optimizer))  # type: ignore[arg-type]  # a known name
    problems = preflight(load_profile(profile_name), cfg, gpus, False, gpus, True, nodes=nodes)
    return "; ".join(problems) or None


def candidates(cfg: Config, gpus: int, nodes: int) -> list:
    """Every shipped profile that can run this many processes, in the order of preference."""
    from dtrain.launch import list_profiles, load_profile
    from dtrain.plan.choose import ORDER, Candidate
    from dtrain.plan.memory import Setting

    world = gpus * nodes
    names = [n for n in ORDER if n in list_profiles()] + [n for n in list_profiles() if n not in ORDER]
    out = []
    for name in names:
        profile = load_profile(name)
        if profile.kind == ("ddp" if world == 1 else "single"):  # one process: no ddp; several: not single
            continue
        if profile.has_mesh and nodes == 1:  # one node: one replica, the fsdp row
            continue
        zero = profile.ds_config.get("zero_optimization", {})
        fsdp_offload = profile.kind == "fsdp" and profile.offloads
        setting = Setting(
            profile=name,
            kind=profile.kind,
            zero_stage=profile.zero_stage,
            offload_optimizer=fsdp_offload
            or zero.get("offload_optimizer", {}).get("device", "none") != "none",
            offload_params=fsdp_offload or zero.get("offload_param", {}).get("device", "none") != "none",
            processes=world,
            shard=gpus
            if profile.has_mesh
            else world,  # hsdp: one replica per node, as dtrain launch makes it
            micro_batch=cfg.train.per_device_batch_size,
            accumulation=cfg.train.gradient_accumulation_steps,
            seq=cfg.data.max_length,
            precision=cfg.train.mixed_precision or str(profile.settings.get("mixed_precision", "no")),
            optimizer=cfg.optim.name,
            checkpointing=bool(cfg.model.gradient_checkpointing),
            loss_chunk=cfg.train.loss_chunk_size,
            ds_zero=zero,
        )
        out.append(Candidate(name, setting, refusal(name, cfg, gpus, nodes)))
    return out


def launch_command(choice, cfg: Config, gpus: int, nodes: int, train_args: list[str]) -> str:
    """The line to paste: `dtrain launch PROFILE --gpus N [--nodes M] -- TRAINING FLAGS`, with the
    recipe's batch flags replaced by the recommended split."""
    s = choice.estimate.setting
    replaced = {"--train.per_device_batch_size", "--train.gradient_accumulation_steps"}
    if "gradient checkpointing" in choice.savers:
        replaced.add("--model.gradient_checkpointing")
    if "chunked loss" in choice.savers:
        replaced.add("--train.loss_chunk_size")
    kept, skip = [], False
    for arg in train_args:
        if skip:
            skip = False
            continue
        key = arg.split("=", 1)[0]
        if key in replaced:
            skip = "=" not in arg
            continue
        kept.append(arg)
    kept += [
        "--train.per_device_batch_size",
        str(s.micro_batch),
        "--train.gradient_accumulation_steps",
        str(s.accumulation),
    ]
    if "gradient checkpointing" in choice.savers:
        kept += ["--model.gradient_checkpointing", "true"]
    if "chunked loss" in choice.savers:
        kept += ["--train.loss_chunk_size", str(s.loss_chunk)]
    head = ["dtrain", "launch", s.profile, "--gpus", str(gpus)] + (
        ["--nodes", str(nodes)] if nodes > 1 else []
    )
    return shlex.join([*head, "--", *kept])


def memory_warning(profile_name: str, cfg: Config, gpus: int, nodes: int) -> str | None:
    """`dtrain launch`'s check: this profile's estimate at the recipe's own settings against the memory of
    the visible GPUs (read through NVML: no CUDA context in the launcher). None when it fits, when no GPU
    is visible, or when the plan cannot be made (the launch goes on either way)."""
    seen = devices.visible_memory()
    if seen is None:
        return None
    try:
        from dtrain.plan.memory import estimate
        from dtrain.plan.model import shape_of

        shape = shape_of(cfg)
        s = next(c for c in candidates(cfg, gpus, nodes) if c.name == profile_name).setting
        e = estimate(shape, activations_of(shape, cfg, s.precision), s)
    except Exception:  # noqa: BLE001 (a launch is never stopped by its memory estimate)
        return None
    if e.total <= seen[0]:
        return None
    return (
        f"dtrain launch: warning: {profile_name} needs about {e.total / 2**30:.1f} GiB per GPU at micro-batch "
        f"{s.micro_batch} (estimate), more than the {seen[0] / 2**30:.1f} GiB of this {seen[1]}; "
        f"`dtrain plan --gpus {gpus}{f' --nodes {nodes}' if nodes > 1 else ''} <training flags>` shows what fits"
    )

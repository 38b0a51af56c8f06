"""The Accelerator and the facts of the process: precision, world-size sanity, run_info.json."""

from __future__ import annotations

import datetime as _dt
import importlib.util
import os
import platform
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from dtrain import mesh
from dtrain.config import Config, UserError, flatten
from dtrain.guards import deepspeed_check_off


def build_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    # A rank that died or hung must not hold the others in a collective forever (guards.py)
    group: dict[str, object] = {"timeout": _dt.timedelta(seconds=cfg.train.collective_timeout_s)}
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # CPU ranks talk over gloo. Without this DeepSpeed on CPU computes a world size that
        # disagrees with Accelerate's and fails its batch-size check.
        group["backend"] = "gloo"
    handlers = [InitProcessGroupKwargs(**group)]
    report_to = None if cfg.log.report_to == "none" else cfg.log.report_to
    # A tracker that is not installed: Accelerate would only warn and log nothing.
    if report_to and importlib.util.find_spec(report_to) is None:
        package = "dtrain[trackers]" if report_to == "tensorboard" else report_to
        raise UserError(
            f"--log.report_to {report_to}: the {report_to} package is not installed; pip install '{package}'"
        )
    kwargs = {}
    if cfg.train.mixed_precision is not None:  # null: keep what the launch config says
        kwargs["mixed_precision"] = cfg.train.mixed_precision
    if cfg.train.compile:  # off: whatever the launch config says (accelerate's --dynamo_backend)
        from accelerate.utils import TorchDynamoPlugin

        kwargs["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor", use_regional_compilation=True)
    with mesh.held_back() as cpu_mesh:  # hsdp: Accelerate refuses a mesh on CPU ranks before FSDP is on
        try:
            accelerator = Accelerator(
                gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                log_with=report_to,
                project_config=ProjectConfiguration(
                    project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")
                ),
                kwargs_handlers=handlers,
                **kwargs,
            )
        except (ValueError, ImportError) as exc:  # e.g. bf16 on a GPU without it, a tracker not installed
            raise UserError(f"could not set up Accelerate: {' '.join(str(exc).split())[:300]}") from None
    enable_fsdp_on_cpu(accelerator)
    if cpu_mesh is not None:
        mesh.apply(accelerator, cpu_mesh)
    configure_deepspeed(accelerator, cfg)
    check_world(accelerator)
    check_optimizer_support(accelerator, cfg)
    check_launch_request(accelerator)
    mesh.check(accelerator, launcher_settings)
    return accelerator


def check_launch_request(accelerator) -> None:
    """Refuse `accelerate launch --num_processes N` (N > 1) that started ONE process, which trains alone.

    Without --multi_gpu (or a multi-process launch config) Accelerate 1.15's simple launcher
    (accelerate/commands/launch.py `simple_launcher`, utils/launch.py `prepare_simple_launcher_cmd_env`)
    runs the script once, with no WORLD_SIZE or RANK; its traces are ACCELERATE_MIXED_PRECISION (always
    set) and MASTER_ADDR/MASTER_PORT (set only when more than one process or machine was asked for). The
    number asked for is in no variable: it is read from the launcher's command line, our parent process
    (/proc, Linux), through Accelerate's own argument parser, else from its --config_file."""
    if accelerator.num_processes != 1 or "WORLD_SIZE" in os.environ or "RANK" in os.environ:
        return
    if "ACCELERATE_MIXED_PRECISION" not in os.environ or "MASTER_ADDR" not in os.environ:
        return
    wanted = _launcher_num_processes(os.getppid())
    if not wanted or wanted <= 1:
        return
    script = sys.argv[0] or "dtrain/train.py"
    args = shlex.join(sys.argv[1:])
    tail = f" {args}" if args else ""
    if not torch.cuda.is_available():
        raise UserError(
            f"accelerate launch asked for {wanted} processes but started one (no --multi_gpu), which would "
            f"train the whole job alone; on CPU run `dtrain launch ddp --cpu --gpus {wanted} --{tail}` or "
            f"`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {wanted} {script}{tail}`"
        )
    visible = torch.cuda.device_count()
    if visible < 2:
        raise UserError(
            f"accelerate launch asked for {wanted} processes but {visible} GPU is visible, so it started one, "
            f"which would train the whole job alone; on one GPU run `python {script}{tail}` (or check "
            "CUDA_VISIBLE_DEVICES)"
        )
    n = min(wanted, visible)
    raise UserError(
        f"accelerate launch asked for {wanted} processes but started one (no --multi_gpu, {visible} GPUs "
        f"visible), which would train the whole job alone; run `dtrain launch ddp --gpus {n} --{tail}` or "
        f"`accelerate launch --multi_gpu --num_processes {n} {script}{tail}`"
    )


def _launcher_num_processes(pid: int) -> int | None:
    """--num_processes of the `accelerate launch` process `pid` (or its config file's), else None."""
    args = _launcher_args(pid)
    if args is None:
        return None
    if args.num_processes is not None:
        return args.num_processes
    return int(launcher_settings(pid, args).get("num_processes") or 0) or None


def _launcher_args(pid: int):
    """The parsed command line of the `accelerate launch` process `pid` (Accelerate's own parser), or None
    when `pid` is not one (not Linux, the parent is gone, another program)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # not Linux, or the parent is gone
        return None
    argv = [a for a in argv if a]
    names = [os.path.basename(a) for a in argv]
    if "accelerate.commands.launch" in argv:
        rest = argv[argv.index("accelerate.commands.launch") + 1 :]
    elif "dtrain.launch_accelerate" in argv:
        rest = argv[argv.index("dtrain.launch_accelerate") + 1 :]
    elif "accelerate-launch" in names:
        rest = argv[names.index("accelerate-launch") + 1 :]
    elif "accelerate" in names and argv[names.index("accelerate") + 1 :][:1] == ["launch"]:
        rest = argv[names.index("accelerate") + 2 :]
    elif "accelerate.commands.accelerate_cli" in argv and "launch" in argv:
        rest = argv[argv.index("launch") + 1 :]
    else:
        return None
    import contextlib
    import io

    try:
        from accelerate.commands.launch import launch_command_parser

        with contextlib.redirect_stderr(io.StringIO()):
            return launch_command_parser().parse_args(rest)
    except BaseException:  # SystemExit from argparse: a command line this Accelerate does not read
        return None


def launcher_settings(pid: int | None = None, args=None) -> dict:
    """The config file of the `accelerate launch` that started this process (its --config_file, else
    Accelerate's default one) as a dict; empty when there is none or it cannot be read."""
    args = args if args is not None else _launcher_args(os.getppid() if pid is None else pid)
    if args is None:
        return {}
    config_file = args.config_file
    if config_file is None:
        from accelerate.commands.config import default_config_file

        config_file = default_config_file if os.path.isfile(default_config_file) else None
    if config_file is None:
        return {}
    try:
        import yaml

        settings = yaml.safe_load(Path(config_file).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return settings if isinstance(settings, dict) else {}


# Accelerate versions whose internals `enable_fsdp_on_cpu` was written and tested against.
FSDP_ON_CPU_TESTED = ("1.15", "1.16")


def enable_fsdp_on_cpu(accelerator) -> bool:
    """CPU rehearsal of FSDP: Accelerate keeps the FSDP plugin only for GPU-like distributed types and on
    MULTI_CPU silently wraps the model in DDP instead. Put FSDP back so `prepare` really shards (FSDP2
    over gloo). Uses Accelerate internals: `check_world` fails loudly if this ever stops working."""
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not (wants_fsdp and state.distributed_type == DistributedType.MULTI_CPU):
        return False
    if not accelerate.__version__.startswith(FSDP_ON_CPU_TESTED) and accelerator.is_main_process:
        print(
            f"dtrain: FSDP on CPU is tested with Accelerate {', '.join(FSDP_ON_CPU_TESTED)}; "
            f"this is {accelerate.__version__}",
            file=sys.stderr,
        )
    # no arguments: reads the FSDP_* variables `accelerate launch` set
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":  # what AcceleratorState does for FSDP on GPUs
        plugin.set_mixed_precision(state.mixed_precision)
    from torch.distributed.fsdp import CPUOffloadPolicy

    if isinstance(plugin.cpu_offload, CPUOffloadPolicy) and not torch.cuda.is_available():
        plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)  # pinning needs an accelerator device
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def configure_deepspeed(accelerator, cfg: Config) -> None:
    """Fill the DeepSpeed "auto" values Accelerate cannot infer: dtrain's DataLoader does not go through
    `prepare` (micro batch), and DeepSpeed clips inside its own step (else at Accelerate's default 1.0)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": ("train.per_device_batch_size", cfg.train.per_device_batch_size),
        "gradient_clipping": ("train.max_grad_norm", cfg.train.max_grad_norm),
        "gradient_accumulation_steps": (
            "train.gradient_accumulation_steps",
            cfg.train.gradient_accumulation_steps,
        ),
    }
    off = deepspeed_check_off(ds, accelerator.mixed_precision)  # guards.py relies on the engine's norm check
    if off:
        raise UserError(f"the DeepSpeed config {off}")
    for key, (flag, value) in wanted.items():
        current = ds.get(key, "auto")
        if current == "auto":
            if key != "gradient_accumulation_steps":  # Accelerate fills that one from the Accelerator
                ds[key] = value
        elif current != value:
            raise UserError(
                f'the DeepSpeed config sets {key}={current} but --{flag} is {value}; set it to "auto" in the JSON'
            )


def check_optimizer_support(accelerator, cfg: Config) -> None:
    """Optimizer x strategy combinations that fail late or are silently changed."""
    from accelerate.utils import DistributedType

    name = cfg.optim.name
    if accelerator.is_fsdp2 and name in ("adamw_8bit", "paged_adamw_8bit"):
        raise UserError(
            f"--optim.name {name} (bitsandbytes) does not work under FSDP2: its kernels reject the sharded "
            "DTensor parameters; use --optim.name adamw_8bit_ao (torchao) or a DeepSpeed profile"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED and name != "adamw":
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if offload not in ("none", None) and ds.get("zero_force_ds_cpu_optimizer", True):
            raise UserError(
                f"DeepSpeed optimizer offload would silently replace --optim.name {name} by its CPU Adam; "
                "use --optim.name adamw with offload, or a profile without offload"
            )


def check_world(accelerator) -> None:
    """Fail fast on launches that would silently train the wrong job."""
    from accelerate.utils import DistributedType

    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    alone = accelerator.distributed_type == DistributedType.NO or accelerator.num_processes != env_world
    for kind, wanted in (("DEEPSPEED", DistributedType.DEEPSPEED), ("FSDP", DistributedType.FSDP)):
        if (
            os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"
            and accelerator.distributed_type != wanted
        ):
            if kind == "DEEPSPEED":
                hint = (
                    " (ACCELERATE_USE_CPU=1 disables DeepSpeed: on CPU launch DeepSpeed profiles without it)"
                )
            elif not torch.cuda.is_available():
                hint = (
                    "; no CUDA GPU is visible: rehearse FSDP on CPU with `dtrain launch fsdp --cpu --gpus N`, or "
                    "prefix the accelerate launch with ACCELERATE_USE_CPU=1"
                )
            else:
                hint = ""
            raise UserError(
                f"the launch config asks for {kind} but Accelerate set up {accelerator.distributed_type}{hint}"
            )
    if env_world > 1 and alone:
        raise UserError(
            f"WORLD_SIZE={env_world} but Accelerate set up a single process, so each of the {env_world} processes "
            "would train the whole job and write the same files; on a CPU-only machine launch with "
            "ACCELERATE_USE_CPU=1"
        )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError(
            "--train.mixed_precision fp16 needs a CUDA GPU (on CPU Accelerate would silently train in fp32); "
            "use --train.mixed_precision bf16 or no"
        )


_SECRET = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.I)
_ENV_PREFIXES = (
    "ACCELERATE_",
    "SLURM_",
    "CUDA_VISIBLE_DEVICES",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "MASTER_",
    "HF_",
    "OMP_NUM_THREADS",
)


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with the value of any secret-looking flag replaced."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag.startswith("--") and _SECRET.search(flag):
            out.append(f"{flag}=***" if eq else flag)
            hide_next = not eq
        else:
            out.append(arg)
    return out


def describe_launch(accelerator) -> str:
    """The start-up line's account of the launch, as prose: `single process on cpu`, `ddp x 2 on cpu`,
    `fsdp x 16 on 2 nodes`, `hsdp 2x8 x 16 on 2 nodes` (dp_replicate x dp_shard), `zero3 x 8` (run_info.json
    keeps Accelerate's own names)."""
    from accelerate.utils import DistributedType

    kind, world = accelerator.distributed_type, accelerator.num_processes
    if kind == DistributedType.NO:
        return f"single process on {accelerator.device.type}"
    if kind == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get(
            "stage", 0
        )
        name = f"zero{stage}"
    elif kind == DistributedType.FSDP:
        grid = mesh.mesh_of(accelerator)
        name = f"hsdp {grid.replicate}x{grid.shard}" if grid else "fsdp"
    else:  # MULTI_CPU, MULTI_GPU and the other data-parallel types
        name = "ddp"
    nodes = world // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    where = f"on {nodes} nodes" if nodes > 1 else f"on {accelerator.device.type}"
    return f"{name} x {world} {where}"


def run_info(accelerator, cfg: Config, argv: list[str], data_stats: dict, num_params: int) -> dict:
    """Everything needed to reproduce the run, and nothing secret."""
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain")) if commit else None
    env = {
        k: ("***" if _SECRET.search(k) else v)
        for k, v in sorted(os.environ.items())
        if k.startswith(_ENV_PREFIXES)
    }
    if torch.cuda.is_available():
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        devices = [platform.processor() or platform.machine()]
    return {
        "command": [sys.executable, *redact_argv(argv)],
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": {
            "python": platform.python_version(),
            **{
                p: _version(p)
                for p in (
                    "dtrain",
                    "torch",
                    "accelerate",
                    "transformers",
                    "datasets",
                    "tokenizers",
                    "safetensors",
                    "deepspeed",
                    "bitsandbytes",
                    "torchao",
                )
            },
        },
        "distributed": {
            "type": str(accelerator.distributed_type),
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "device": str(accelerator.device),
        },
        "hardware": {
            "host": platform.node(),
            "cpu_count": os.cpu_count(),
            "devices": devices,
            "torch_threads": torch.get_num_threads(),
        },
        "model_parameters": num_params,
        "data": data_stats,
        "environment": env,
        "config": flatten(cfg),
    }


def fsdp_unit_classes(model) -> list[str]:
    """Class names of the modules that are FSDP2 units (`fully_shard` was applied to them) in a prepared
    model, sorted and unique; empty when the model is not FSDP-sharded. `fully_shard` swaps a module's class
    for a generated `FSDP<Name>` subclass: the name reported is the model's own class (`LlamaDecoderLayer`)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return []
    names = set()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            own = next((c for c in type(module).__mro__ if not issubclass(c, FSDPModule)), type(module))
            names.add(own.__name__)
    return sorted(names)


def check_fsdp_wrapping(accelerator, model) -> None:
    """Refuse an FSDP launch whose transformer-based wrap would find no layer class to wrap.

    Accelerate 1.15 (fsdp_utils.fsdp2_prepare_auto_wrap_policy, FullyShardedDataParallelPlugin.
    set_auto_wrap_policy) takes the class names from fsdp_transformer_layer_cls_to_wrap, or when that is
    unset from the model's `_no_split_modules`; with neither it wraps nothing but the root (plus the
    embedding and head), silently: one unit gathered whole on every rank, no memory saved over DDP. A
    class name the model does not contain fails inside `prepare` with a ValueError: refused here first."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    policy = getattr(plugin, "auto_wrap_policy", None)
    policy = getattr(policy, "func", policy)  # a functools.partial once Accelerate has bound the classes
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if policy is not transformer_auto_wrap_policy:
        return
    model_class = type(model).__name__
    names = plugin.transformer_cls_names_to_wrap
    if names is not None:
        names = [n.strip() for n in names if n.strip()]
    if names is None:
        names = list(getattr(model, "_no_split_modules", None) or [])
        if not names:
            raise UserError(
                f"FSDP: {model_class} has no _no_split_modules, so the transformer-based wrap of the fsdp profile "
                "would shard the whole model as one unit; set fsdp_transformer_layer_cls_to_wrap to its decoder "
                "layer class in the profile YAML (or env FSDP_TRANSFORMER_CLS_TO_WRAP), or use a ZeRO profile"
            )
    present = {type(m).__name__ for m in model.modules()}
    missing = [n for n in names if n not in present]
    if missing or not names:
        layers = sorted(n for n in present if re.search(r"(Layer|Block)$", n))
        raise UserError(
            f"FSDP: fsdp_transformer_layer_cls_to_wrap names {', '.join(missing) or 'no class'}, which "
            f"{model_class} does not contain (its layer-like classes: {', '.join(layers) or 'none'}); fix it in "
            "the profile YAML (or env FSDP_TRANSFORMER_CLS_TO_WRAP), or use a ZeRO profile"
        )


def compiled_modules(model) -> list[str]:
    """Classes of the modules torch.compile holds (Accelerate's regional compilation: the decoder layers
    and the leaf modules around them), for run_info.json."""
    from torch._dynamo.eval_frame import OptimizedModule

    names = set()
    for module in model.modules():
        if isinstance(module, OptimizedModule):
            names.add(type(module._orig_mod).__name__)
        elif getattr(module, "_compiled_call_impl", None) is not None:  # compiled in place (FSDP2, DeepSpeed)
            names.add(type(module).__name__)
    return sorted(names)


def count_sharded(model) -> str:
    """How many parameter tensors are DTensors (FSDP2 shards): proof that sharding really happened."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return f"{sum(isinstance(p, DTensor) for p in params)}/{len(params)}"

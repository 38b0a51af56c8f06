"""`dtrain launch PROFILE ... -- [train.py args]`: pre-flight checks, then the exact `accelerate launch`.

This is the launch side: it runs before any training process starts and never imports the
training modules beyond the config schema (to validate the training flags up front).

    dtrain launch zero3 --gpus 8 -- --config my.yaml
    dtrain launch fsdp --cpu --gpus 2 -- --train.max_steps 20      # rehearse on 2 CPU processes (gloo)
    dtrain launch hsdp --cpu --gpus 4 --replicas 2 -- ...          # a 2 x 2 mesh (dp_replicate x dp_shard)
    dtrain launch ddp --nodes 2 --node-rank 0 --main-address 10.0.0.1:29500 -- --config my.yaml
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dtrain.background_save import REFUSED_UNDER_DEEPSPEED
from dtrain.cli import Parser
from dtrain.config import Config, ConfigError, UserError, parse_config
from dtrain.guards import deepspeed_check_off
from dtrain.mesh import ASKED, Mesh
from dtrain.peft import qlora_refusal
from dtrain.process import run_forwarding_signals

REPO = Path(__file__).resolve().parent.parent
PROFILE_DIR = REPO / "accelerate_configs"
TRAIN_SCRIPT = REPO / "dtrain" / "train.py"
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")
DEFAULT_PORT = 29500
SHUTDOWN_TIMEOUT_S = 120  # how long torchrun waits for the ranks to save and exit after a signal


@dataclass
class Profile:
    name: str
    path: Path
    settings: dict
    ds_config_path: Path | None = None
    ds_config: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """single, ddp, fsdp or deepspeed."""
        dist = self.settings.get("distributed_type", "NO")
        return {"DEEPSPEED": "deepspeed", "FSDP": "fsdp", "MULTI_GPU": "ddp"}.get(dist, "single")

    @property
    def has_mesh(self) -> bool:
        """A 2-D data-parallel mesh (hsdp): the YAML has a parallelism_config block."""
        return bool(self.settings.get("parallelism_config"))

    @property
    def zero_stage(self) -> int | None:
        return self.ds_config.get("zero_optimization", {}).get("stage") if self.kind == "deepspeed" else None

    @property
    def offloads(self) -> bool:
        if self.kind == "fsdp":
            return bool(self.settings.get("fsdp_config", {}).get("fsdp_offload_params"))
        zero = self.ds_config.get("zero_optimization", {})
        return any(
            zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param")
        )


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str) -> Profile:
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(
            f"unknown profile '{name_or_path}'; choose one of {', '.join(list_profiles())} or give a YAML path"
        )
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"profile {path}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    profile = Profile(name=path.stem, path=path.resolve(), settings=settings)
    if profile.kind == "deepspeed":
        rel = settings.get("deepspeed_config", {}).get("deepspeed_config_file")
        if not rel:
            raise UserError(f"profile {path}: deepspeed_config.deepspeed_config_file is not set")
        ds_path = Path(rel) if Path(rel).is_absolute() else REPO / rel
        if not ds_path.is_file():
            raise UserError(f"profile {path}: DeepSpeed config '{rel}' not found (looked at {ds_path})")
        try:
            profile.ds_config = json.loads(ds_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{ds_path}: not valid JSON ({exc})") from None
        profile.ds_config_path = ds_path
    return profile


def preflight(
    profile: Profile, cfg: Config, gpus: int, cpu: bool, gpus_present: int, bf16_ok: bool, nodes: int = 1
) -> list[str]:
    """Every reason the launch would fail or silently do the wrong thing, found before any process starts.
    `gpus` is processes per node."""
    problems: list[str] = []
    opt = cfg.optim.name
    if opt in BNB_OPTIMIZERS and profile.kind == "fsdp":
        problems.append(
            f"--optim.name {opt} cannot run under {profile.name}: bitsandbytes 8-bit optimizers fail on FSDP2's "
            "sharded DTensor parameters; use --optim.name adamw_8bit_ao (torchao, works on DTensor)"
        )
    if (
        profile.kind == "deepspeed"
        and opt != "adamw"
        and not profile.ds_config.get("zero_allow_untested_optimizer")
    ):
        problems.append(
            f"--optim.name {opt} is a client optimizer DeepSpeed has not tested: set "
            f'"zero_allow_untested_optimizer": true in {profile.ds_config_path}'
        )
    force_cpu_adam = profile.ds_config.get("zero_force_ds_cpu_optimizer", True)
    if profile.kind == "deepspeed" and profile.offloads and opt != "adamw" and force_cpu_adam:
        problems.append(
            f"--optim.name {opt} with {profile.name}: DeepSpeed CPU offload replaces the optimizer by its own "
            "fp32 CPU Adam, so an 8-bit (or any non-AdamW) optimizer would silently vanish; use --optim.name "
            "adamw, or a profile without offload"
        )
    if not cpu:
        if gpus_present == 0:
            problems.append(
                "no CUDA GPU is visible; rehearse on CPU with --cpu, or check CUDA_VISIBLE_DEVICES"
            )
        elif gpus > gpus_present:
            problems.append(f"--gpus {gpus} but only {gpus_present} GPU(s) are visible")
        precision = cfg.train.mixed_precision or profile.settings.get("mixed_precision")
        if precision == "bf16" and gpus_present and not bf16_ok:
            problems.append(
                "bf16 needs an Ampere or newer GPU, which this one is not; use --train.mixed_precision fp16"
            )
    elif cfg.train.mixed_precision == "fp16":
        problems.append("--train.mixed_precision fp16 needs a GPU; rehearse on CPU with bf16 or no")
    if profile.kind == "single" and gpus > 1:
        problems.append(
            f"profile {profile.name} runs one process; pick ddp, fsdp or a zero profile for --gpus {gpus}"
        )
    if profile.kind == "single" and nodes > 1:
        problems.append(
            f"profile {profile.name} runs one process on one machine; pick ddp, fsdp or a zero profile for "
            f"--nodes {nodes}"
        )
    if profile.kind == "deepspeed":
        problems += deepspeed_conflicts(profile, cfg, gpus * nodes)
        if cfg.checkpoint.async_save:
            problems.append(REFUSED_UNDER_DEEPSPEED)
    refusal = qlora_refusal(profile.kind) if cfg.peft.method == "qlora" else None
    if refusal:
        problems.append(
            f"--peft.method qlora cannot run under {profile.name}: {refusal}; use the ddp or "
            "single_gpu profile"
        )
    if cfg.peft.method != "none" and importlib.util.find_spec("peft") is None:
        problems.append(f"--peft.method {cfg.peft.method} needs the peft library: pip install 'dtrain[peft]'")
    needs = {"deepspeed": ("deepspeed", "deepspeed")}.get(profile.kind)
    if needs and importlib.util.find_spec(needs[0]) is None:
        problems.append(f"profile {profile.name} needs DeepSpeed: pip install 'dtrain[{needs[1]}]'")
    if opt in BNB_OPTIMIZERS and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"--optim.name {opt} needs bitsandbytes: pip install 'dtrain[bnb]'")
    if opt == "adamw_8bit_ao" and importlib.util.find_spec("torchao") is None:
        problems.append(f"--optim.name {opt} needs torchao: pip install 'dtrain[torchao]'")
    return problems


def mesh_problems(profile: Profile, processes: int, nodes: int, replicas: int | None) -> list[str]:
    """--replicas against the profile and the job's size."""
    if not profile.has_mesh:
        return [] if replicas is None else [f"--replicas is for the hsdp profile, not {profile.name}"]
    r = nodes if replicas is None else replicas
    if r < 1 or processes % r:
        return [
            f"--replicas {r} must divide the job's {processes} processes (dp_shard = processes / replicas); "
            f"choose one of {', '.join(str(d) for d in range(1, processes + 1) if processes % d == 0)}"
        ]
    return []


def deepspeed_conflicts(profile: Profile, cfg: Config, processes: int) -> list[str]:
    """Values the DeepSpeed JSON fixes that contradict the training flags (else found only inside the
    ranks, after start-up), and sections that would fight dtrain's own optimizer and schedule."""
    ds, name, t = profile.ds_config, profile.ds_config_path, cfg.train
    problems = []
    fixed = {
        "train_micro_batch_size_per_gpu": ("train.per_device_batch_size", t.per_device_batch_size),
        "gradient_accumulation_steps": ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
        "gradient_clipping": ("train.max_grad_norm", t.max_grad_norm),
    }
    for key, (flag, value) in fixed.items():
        current = ds.get(key, "auto")
        if current != "auto" and current != value:
            problems.append(
                f'{name} sets {key}={current} but --{flag} is {value}; set it to "auto" in the JSON (dtrain '
                f"fills it from --{flag}) or pass --{flag} {current}"
            )
    total = ds.get("train_batch_size", "auto")
    global_batch = t.per_device_batch_size * t.gradient_accumulation_steps * processes
    if total != "auto" and total != global_batch:
        problems.append(
            f"{name} sets train_batch_size={total} but --train.per_device_batch_size x "
            f"--train.gradient_accumulation_steps x {processes} processes = {global_batch}; set it to "
            '"auto" in the JSON'
        )
    precision = t.mixed_precision
    for key in ("bf16", "fp16"):
        enabled = (ds.get(key) or {}).get("enabled", "auto")
        if precision is not None and enabled is True and precision != key:
            problems.append(
                f'{name} enables {key} but --train.mixed_precision is {precision}; set {key}.enabled to "auto" '
                "in the JSON"
            )
        if enabled is False and precision == key:
            problems.append(
                f'{name} disables {key} but --train.mixed_precision is {key}; set {key}.enabled to "auto" in '
                "the JSON"
            )
    off = deepspeed_check_off(ds, precision)
    if off:
        problems.append(f"{name} {off}")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            problems.append(
                f'{name} has an "{section}" section, but dtrain builds its own {section} from --optim.*; '
                "delete that section"
            )
    return problems


def build_command(
    profile: Profile,
    processes: int,
    nodes: int,
    node_rank: int,
    address: str | None,
    cpu: bool,
    train_args: list[str],
    replicas: int | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command and the environment it needs. `replicas`: dp_replicate of a mesh
    profile (hsdp), default one per node."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(profile.path),
        "--num_processes",
        str(processes * nodes),
        "--num_machines",
        str(nodes),
    ]
    env: dict[str, str] = {"DTRAIN_PROFILE": profile.name}  # recorded in every checkpoint's marker
    # torchrun passes only TERM, INT, HUP and QUIT on to the ranks, and SIGKILLs them 30 s after: pass the
    # USR signals too (Slurm's --signal) and leave a stop on request time to commit its checkpoint.
    env["PET_SIGNALS_TO_HANDLE"] = os.environ.get(
        "PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"
    )
    env["PET_SHUTDOWN_TIMEOUT"] = os.environ.get("PET_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    if profile.ds_config_path is not None:  # absolute, so the launch works from any directory
        cmd += ["--deepspeed_config_file", str(profile.ds_config_path)]
    if profile.has_mesh:  # the sizes on the command line override the YAML's `auto`; the ranks check them
        grid = Mesh(replicas or nodes, processes * nodes // (replicas or nodes))
        cmd += [
            "--parallelism_config_dp_replicate_size",
            str(grid.replicate),
            "--parallelism_config_dp_shard_size",
            str(grid.shard),
        ]
        env[ASKED] = grid.env()
    if nodes > 1:
        host, _, port = (address or "").partition(":")
        cmd += [
            "--machine_rank",
            str(node_rank),
            "--main_process_ip",
            host,
            "--main_process_port",
            port or str(DEFAULT_PORT),
        ]
    elif address:
        cmd += ["--main_process_port", address.partition(":")[2] or str(DEFAULT_PORT)]
    if cpu and profile.kind in ("ddp", "fsdp", "single"):
        # gloo ranks. Not for DeepSpeed: there it would turn the run into plain DDP; the script
        # passes gloo to DeepSpeed itself when CUDA is absent.
        env["ACCELERATE_USE_CPU"] = "1"
    cmd += [str(TRAIN_SCRIPT), *train_args]
    return cmd, env


def split_train_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """`COMMAND ARGS -- TRAIN_ARGS` -> (ARGS, TRAIN_ARGS)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, train_args = split_train_args(argv)
    parser = Parser(prog="dtrain launch", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "profile", help=f"one of {', '.join(list_profiles())}, or a path to an accelerate config YAML"
    )
    parser.add_argument(
        "--gpus", default="auto", help="processes per node: a number or auto (all visible GPUs; 2 with --cpu)"
    )
    parser.add_argument("--nodes", type=int, default=1, help="machines in the job")
    parser.add_argument("--node-rank", type=int, default=0, help="this machine's rank (0 = the head)")
    parser.add_argument("--main-address", help="HOST[:PORT] of the head node (required with --nodes > 1)")
    parser.add_argument(
        "--replicas",
        type=int,
        help="hsdp: dp_replicate, the number of sharded replicas (default: one per node); dp_shard = processes / it",
    )
    parser.add_argument("--cpu", action="store_true", help="rehearse the profile on CPU processes over gloo")
    parser.add_argument(
        "--dry-run", action="store_true", help="check everything, print the command, start nothing"
    )
    return parser.parse_args(argv), train_args


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return launch(args, train_args)
    except UserError as exc:
        print(f"dtrain launch: error: {exc}", file=sys.stderr)
        return 2


def launch(args: argparse.Namespace, train_args: list[str]) -> int:
    profile = load_profile(args.profile)
    try:
        cfg = parse_config(train_args)
    except ConfigError as exc:
        raise UserError(f"training flags after --: {exc}") from None
    present, bf16_ok = (0, False) if args.cpu else visible_gpus()
    if args.gpus == "auto":
        gpus = (1 if profile.kind == "single" else 2) if args.cpu else max(present, 1)
    elif args.gpus.isdigit() and int(args.gpus) > 0:
        gpus = int(args.gpus)
    else:
        raise UserError(f"--gpus must be a positive number or auto (got {args.gpus!r})")
    if args.nodes < 1 or not 0 <= args.node_rank < args.nodes:
        raise UserError(f"--node-rank must be in [0, --nodes) (got {args.node_rank} of {args.nodes})")
    if args.nodes > 1 and not args.main_address:
        raise UserError("--nodes > 1 needs --main-address HOST[:PORT] of the head node")
    if not args.cpu and profile.path.parent == PROFILE_DIR:  # the planner knows the shipped profiles
        from dtrain.plan import memory_warning  # imports transformers only now, only with a GPU in view

        warning = memory_warning(profile.name, cfg, gpus, args.nodes)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    problems = preflight(profile, cfg, gpus, args.cpu, present, bf16_ok, nodes=args.nodes)
    problems += mesh_problems(profile, gpus * args.nodes, args.nodes, args.replicas)
    if problems:
        raise UserError("; ".join(problems))
    cmd, env = build_command(
        profile, gpus, args.nodes, args.node_rank, args.main_address, args.cpu, train_args, args.replicas
    )
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    print(f"dtrain launch: {(shown + ' ') if shown else ''}{shlex.join(cmd)}", flush=True)
    if args.dry_run:
        return 0
    return run(cmd, {**os.environ, **env})


def visible_gpus() -> tuple[int, bool]:
    """(CUDA GPUs visible, whether they do bf16). Imports torch: a --cpu rehearsal never pays for it."""
    import torch

    present = torch.cuda.device_count()
    return present, bool(present) and torch.cuda.is_bf16_supported()


def run(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher, pass SIGINT/SIGTERM/SIGUSR1/SIGUSR2 on to it and return its exit code. The printed
    `accelerate launch` command runs through `dtrain.launch_accelerate`: the same launcher, but a failed rank
    ends the job with that rank's exit code and one line, not the launcher's traceback."""
    cmd = ["dtrain.launch_accelerate" if part == "accelerate.commands.launch" else part for part in cmd]
    return run_forwarding_signals(cmd, env)

"""`dtrain slurm PROFILE [options] -- [train.py args]`: the sbatch command for launch/slurm/, printed, then run.

    dtrain slurm fsdp --nodes 2 --gpus-per-node 8 --time 24:00:00 --partition gpu -- --config my.yaml
    dtrain slurm zero3 --nodes 4 --account proj --dry-run -- --config my.yaml   # print it, submit nothing

The job scripts read their settings from the environment (PROFILE, RECIPE, OUTPUT_DIR, TRAIN_ARGS,
MAX_RESTARTS, GPUS_PER_NODE, REPLICAS, PYTHON), which sbatch passes on; this command fills them and the
common sbatch options in, checks the profile and the training flags first, and prints the exact command.
Launch side only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys

from dtrain.cli import Parser
from dtrain.config import ConfigError, UserError, parse_config
from dtrain.launch import REPO, list_profiles, load_profile, mesh_problems, split_train_args

SCRIPTS = REPO / "launch" / "slurm"


def build_sbatch(args: argparse.Namespace, train_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The sbatch command line and the environment variables the job script reads."""
    script = SCRIPTS / ("single_node.sbatch" if args.nodes == 1 else "multi_node.sbatch")
    cmd = ["sbatch", f"--nodes={args.nodes}", "--ntasks-per-node=1", f"--job-name=dtrain-{args.profile}"]
    if args.gpus_per_node:
        cmd.append(f"--gres=gpu:{args.gpus_per_node}")
    if args.cpus_per_task:
        cmd.append(f"--cpus-per-task={args.cpus_per_task}")
    for flag in ("time", "partition", "account"):
        value = getattr(args, flag)
        if value:
            cmd.append(f"--{flag}={value}")
    cmd.append(str(script))
    env = {"PROFILE": args.profile, "PYTHON": sys.executable}  # the interpreter that has dtrain installed
    if args.recipe:
        env["RECIPE"] = args.recipe
    if args.output_dir:
        env["OUTPUT_DIR"] = args.output_dir
    if train_args:
        env["TRAIN_ARGS"] = shlex.join(train_args)
    if args.max_restarts is not None:
        env["MAX_RESTARTS"] = str(args.max_restarts)
    if args.gpus_per_node:
        env["GPUS_PER_NODE"] = str(args.gpus_per_node)
    if args.replicas:
        env["REPLICAS"] = str(args.replicas)
    return cmd, env


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, train_args = split_train_args(argv)
    parser = Parser(prog="dtrain slurm", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "profile", help=f"one of {', '.join(list_profiles())}, or a path to an accelerate config"
    )
    parser.add_argument(
        "--nodes", type=int, default=1, help="nodes (1: single_node.sbatch, more: multi_node.sbatch)"
    )
    parser.add_argument(
        "--gpus-per-node", type=int, help="GPUs per node (--gres=gpu:N); none: the node's CPUs"
    )
    parser.add_argument("--replicas", type=int, help="hsdp: dp_replicate (REPLICAS; default one per node)")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores for each node's launcher and its ranks")
    parser.add_argument("--time", help="time limit, e.g. 24:00:00 (the job stops and requeues before it)")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--account", help="Slurm account")
    parser.add_argument("--recipe", help="recipe YAML (RECIPE)")
    parser.add_argument("--output-dir", help="run directory (OUTPUT_DIR; default runs/slurm-<job id>)")
    parser.add_argument(
        "--max-restarts", type=int, help="requeues after preemption or time limit (MAX_RESTARTS)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch command, submit nothing")
    return parser.parse_args(argv), train_args


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return submit(args, train_args)
    except UserError as exc:
        print(f"dtrain slurm: error: {exc}", file=sys.stderr)
        return 2


def submit(args: argparse.Namespace, train_args: list[str]) -> int:
    profile = load_profile(args.profile)  # an unknown profile fails here, not in the queue hours later
    if args.nodes < 1:
        raise UserError(f"--nodes must be >= 1 (got {args.nodes})")
    if args.gpus_per_node is not None and args.gpus_per_node < 1:
        raise UserError(f"--gpus-per-node must be >= 1 (got {args.gpus_per_node})")
    if args.max_restarts is not None and args.max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0 (got {args.max_restarts})")
    if args.replicas is not None and (args.gpus_per_node or not profile.has_mesh):
        problems = mesh_problems(profile, (args.gpus_per_node or 1) * args.nodes, args.nodes, args.replicas)
        if problems:
            raise UserError("; ".join(problems))
    if args.recipe and not os.path.isfile(args.recipe):
        raise UserError(f"--recipe: file '{args.recipe}' does not exist")
    try:  # the training flags, as the job will read them
        parse_config([*(["--config", args.recipe] if args.recipe else []), *train_args])
    except ConfigError as exc:
        raise UserError(f"training flags after --: {exc}") from None
    cmd, env = build_sbatch(args, train_args)
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    print(f"dtrain slurm: {shown} {shlex.join(cmd)}", flush=True)
    if args.dry_run:
        return 0
    if shutil.which("sbatch") is None:
        raise UserError(
            "sbatch is not on PATH: run this on a Slurm login node, or use --dry-run to see the command"
        )
    return subprocess.run(cmd, env={**os.environ, **env}).returncode

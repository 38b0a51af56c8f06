"""The `dtrain` console script: `dtrain train [flags]` runs dtrain/train.py in this process."""

from __future__ import annotations

import argparse
import sys

from dtrain.process import guarded  # light: no torch

USAGE = """usage: dtrain <command> [args]

commands:
  train    run the training script (same flags as `python dtrain/train.py`; --help lists them)
  launch   check a launch profile and run `accelerate launch` with it (dtrain launch --help)
  prepare  tokenize and pack every data source once, for --data.prepared (dtrain prepare --help)
  export   turn a checkpoint of any profile into a Hugging Face model directory (dtrain export --help)
  slurm    submit a launch profile as a Slurm job with launch/slurm/*.sbatch (dtrain slurm --help)
  plan     estimate the memory per GPU of every profile and recommend one that fits (dtrain plan --help)
  plot     draw a run's curves (loss, lr, gradient norm, throughput, memory) to PNGs (dtrain plot --help)
  plot-lr  draw a recipe's learning-rate schedule, as its scheduler produces it (dtrain plot-lr --help)
"""


class Parser(argparse.ArgumentParser):
    """The subcommands' argument parser: a bad or missing argument is one line, as every dtrain error
    (argparse prints its whole usage first; `--help` still shows it)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


HEAVY = ("train", "prepare", "export", "plan", "plot-lr")  # these import torch and the Hugging Face libraries


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in HEAVY:
        from dtrain import quiet

        quiet.install()
    if command == "train":
        from dtrain.train import run

        return run(rest)
    if command == "launch":
        from dtrain.launch import main as launch_main

        return launch_main(rest)
    if command == "slurm":
        from dtrain.slurm import main as slurm_main

        return slurm_main(rest)
    if command == "prepare":
        from dtrain.data.prepare import prepare_main

        return guarded(prepare_main, rest)
    if command == "export":
        from dtrain.export import main as export_main

        return export_main(rest)
    if command == "plan":
        from dtrain.plan import main as plan_main

        return guarded(plan_main, rest)
    if command == "plot":
        from dtrain.plots import plot_main

        return guarded(plot_main, rest)
    if command == "plot-lr":
        from dtrain.plots import plot_lr_main

        return guarded(plot_lr_main, rest)
    if command in ("-V", "--version"):
        from dtrain import __version__

        print(f"dtrain {__version__}")
        return 0
    print(f"dtrain: error: unknown command '{command}'; see `dtrain --help`", file=sys.stderr)
    return 2


def console() -> None:
    """The `dtrain` console script."""
    from dtrain.process import exit_with

    exit_with(main())


if __name__ == "__main__":
    console()

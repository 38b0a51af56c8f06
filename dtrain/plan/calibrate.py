"""`dtrain plan --calibrate`: two real steps of the recommendation on this machine, estimated / measured.

The recommended `dtrain launch` line runs as printed (with `--cpu` when no GPU is visible), two steps,
no eval, into a temporary directory; its first metrics row gives each rank's peak: `max_memory_allocated`
on CUDA, the peak resident set on CPU, where the process's own Python,
libraries and data count too, so the CPU figure is an upper bound, not a check of the estimate.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from dtrain.config import UserError

GiB = 2**30
SHORT = [
    "--train.max_steps",
    "2",
    "--eval.steps",
    "0",
    "--eval.num_generate",
    "0",
    "--eval.num_samples",
    "0",
    "--checkpoint.save_steps",
    "0",
    "--log.every_steps",
    "1",
    "--log.plots",
    "false",
    "--log.progress_bar",
    "false",
]


def calibrate(plan) -> int:
    if plan.choice is None:
        raise UserError("--calibrate: nothing fits, so there is no recommendation to run")
    from dtrain.plan import devices

    words = shlex.split(plan.command)
    head, train_args = words[2 : words.index("--")], words[words.index("--") + 1 :]
    on_gpu = devices.visible_memory() is not None
    with tempfile.TemporaryDirectory(prefix="dtrain-calibrate-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "dtrain.cli", "launch", *head, *([] if on_gpu else ["--cpu"]), "--"]
        cmd += [*train_args, *SHORT, "--output_dir", str(out)]
        print(f"dtrain plan: calibrating: {shlex.join(['dtrain', *cmd[3:]])}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " ".join(proc.stderr.split())[-300:]
            raise UserError(f"--calibrate: the run exited {proc.returncode}: {tail}")
        row = next(
            json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
        )
    estimated = plan.choice.estimate.total
    measured = max(row["peak_memory_mib_per_rank"]) * 2**20
    where = "max_memory_allocated" if on_gpu else "peak RSS of the CPU process, an upper bound"
    print(
        f"dtrain plan: estimated {estimated / GiB:.2f} GiB, measured {measured / GiB:.2f} GiB ({where}): "
        f"estimated / measured = {estimated / measured:.2f}"
    )
    return 0

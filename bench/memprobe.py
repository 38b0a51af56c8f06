"""Per-rank bytes of parameters, gradients and optimizer state under a launch profile.

bench/run.py starts this script with the exact `accelerate launch` command and environment that
`dtrain launch PROFILE --cpu --gpus 2` builds (`dtrain.launch.build_command`), this file standing in for
dtrain/train.py, followed by ordinary training flags. Every rank then builds dtrain's own components
(`dtrain.train.setup` on a parsed Config: accelerator, model, optimizer, `accelerator.prepare`), trains
two optimizer steps with dtrain's `take_step`, and writes `$BENCH_MEMPROBE_OUT/rank<R>.json`.

What is counted, per rank, is `dtrain.rank_memory.HeldBytes` (the same count every run logs in its first
metrics row; its docstring says what each column holds), plus the peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    out = Path(os.environ["BENCH_MEMPROBE_OUT"])

    from dtrain.config import parse_config
    from dtrain.modeling import count_parameters
    from dtrain.rank_memory import HeldBytes
    from dtrain.train import setup, take_step

    cfg = parse_config(argv)
    run = setup(cfg, argv)
    acc = run.accelerator
    held = HeldBytes(acc, run.model, run.optimizer)  # run.held has measured nothing yet: measure afresh
    batches = run.train_batches()
    for _ in range(2):  # the second step: optimizer state exists, every buffer is in its steady state
        window = [next(batches) for _ in range(cfg.train.gradient_accumulation_steps)]
        take_step(run, window)
    counts = held.measure()
    result = {
        "rank": acc.process_index,
        "world_size": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "num_params": count_parameters(run.model),
        "params": counts["params"],
        "grads": counts["grads"],
        "grads_at": {k: g for k, (g, _) in held.grads.items()},
        "optim_state": counts["optim"],
        "master": counts["master"],
        "buffers": counts["buffers"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(result, indent=1))
    run.stop.close()
    acc.wait_for_everyone()
    acc.end_training()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from dtrain.process import exit_with  # the way dtrain's own processes end: like with like

    exit_with(main(sys.argv[1:]))

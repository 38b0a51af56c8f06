"""Per-rank bytes of parameters, gradients and optimizer state under a launch profile.

bench/run.py starts this script with the exact `accelerate launch` command and environment that
`dtrain launch PROFILE --cpu --gpus 2` builds (`dtrain.launch.build_command`), this file standing in for
dtrain/train.py, followed by ordinary training flags. Every rank then builds dtrain's own components
(`dtrain.train.setup` on a parsed Config: accelerator, model, optimizer, `accelerator.prepare`), trains
two optimizer steps with dtrain's `take_step`, and writes `$BENCH_MEMPROBE_OUT/rank<R>.json`.

What is counted, per rank, in bytes of the unique storages behind the tensors (a view into a flat
buffer counts the buffer once; nothing is counted twice across columns):

- params: the model's parameters as held locally: the tensor itself (DDP, ZeRO-1/2, whose parameters are
  views into DeepSpeed's flat groups), `p.ds_tensor` (ZeRO-3 partition), `DTensor.to_local()` (FSDP2).
- grads: `p.grad` (the local shard under FSDP2), `p.grad_accum`, and DeepSpeed's partitioned gradients
  (`averaged_gradients` and `grads_in_partition` under ZeRO-1/2, `grad_partitions_flat_buffer` under
  ZeRO-3), taken at two instants, the larger kept: just before the update (a wrapper on the optimizer's
  `step`, or on the DeepSpeed engine's `step`, which Accelerate calls inside `backward`) and, under
  DeepSpeed, at the end of backward, before its epilogue reduces and frees what is not the rank's own.
- optim_state: `dtrain.optim.optimizer_state_bytes` (exp_avg, exp_avg_sq, step) on the live optimizer.
- master: DeepSpeed's fp32 master partition when it is a separate copy (this DeepSpeed keeps one even in
  fp32 training): outside the paper's fp32 formula, shown apart.
- buffers: DeepSpeed reduce buckets alive at those instants (claimed before the gradients, since ZeRO-1/2
  gradients live inside them during backward). DDP's own gradient buckets live in C++ and are not
  visible here (another 4 bytes/param under DDP).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _flat(value):
    """Tensors inside a value that may be a tensor, a list/tuple/dict of them, or None."""
    import torch

    if value is None:
        return
    if torch.is_tensor(value):
        yield _local(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flat(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _flat(v)


class Ledger:
    """Unique storages, each assigned to the first column that claims it."""

    def __init__(self):
        self.owner: dict[int, str] = {}
        self.bytes: dict[str, int] = {}

    def claim(self, column: str, tensors) -> None:
        self.bytes.setdefault(column, 0)
        for t in tensors:
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if not ptr or not size or ptr in self.owner:
                continue
            self.owner[ptr] = column
            self.bytes[column] += size


def param_tensors(model):
    for p in model.parameters():
        yield _local(p.ds_tensor) if hasattr(p, "ds_tensor") else _local(p)


def grad_tensors(model, ds_optimizer):
    for p in model.parameters():
        yield from _flat(p.grad)
        yield from _flat(getattr(p, "grad_accum", None))
    if ds_optimizer is not None:
        for name in ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer"):
            yield from _flat(getattr(ds_optimizer, name, None))


def master_tensors(ds_optimizer):
    if ds_optimizer is None:
        return
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        yield from _flat(getattr(ds_optimizer, name, None))


def bucket_tensors(ds_optimizer):
    buckets = getattr(ds_optimizer, "ipg_buckets", None) or {}
    for bucket in buckets.values():
        yield from _flat(getattr(bucket, "buffer", None))


def main(argv: list[str]) -> int:
    out = Path(os.environ["BENCH_MEMPROBE_OUT"])

    from dtrain.config import parse_config
    from dtrain.modeling import count_parameters
    from dtrain.optim import optimizer_state_bytes
    from dtrain.train import setup, take_step

    cfg = parse_config(argv)
    run = setup(cfg, argv)
    acc = run.accelerator
    is_ds = acc.distributed_type.name == "DEEPSPEED"
    ds_optimizer = None
    grads: dict[str, int] = {}

    def measure_grads(where: str):
        ledger = Ledger()
        ledger.claim("params", param_tensors(run.model))
        ledger.claim("buffers", bucket_tensors(ds_optimizer) if ds_optimizer is not None else ())
        ledger.claim("grads", grad_tensors(run.model, ds_optimizer))
        grads[where] = {"grads": ledger.bytes["grads"], "buffers": ledger.bytes["buffers"]}

    def before(fn, where: str):
        def wrapped(*args, **kwargs):
            measure_grads(where)
            return fn(*args, **kwargs)

        return wrapped

    if is_ds:
        engine = acc.deepspeed_engine_wrapped.engine
        ds_optimizer = engine.optimizer
        # Accelerate's backward() runs engine.backward, then engine.step: the update happens there
        engine.step = before(engine.step, "update")
        # the end of backward, before DeepSpeed reduces and frees what is not the rank's own
        epilogue = getattr(ds_optimizer, "independent_gradient_partition_epilogue", None)
        if epilogue is not None:
            ds_optimizer.independent_gradient_partition_epilogue = before(epilogue, "backward_end")
    else:
        run.optimizer.step = before(run.optimizer.step, "update")

    batches = run.train_batches()
    for _ in range(2):  # the second step: optimizer state exists, every buffer is in its steady state
        window = [next(batches) for _ in range(cfg.train.gradient_accumulation_steps)]
        take_step(run, window)

    ledger = Ledger()
    ledger.claim("params", param_tensors(run.model))
    ledger.claim("master", master_tensors(ds_optimizer))
    state = optimizer_state_bytes(run.optimizer)
    result = {
        "rank": acc.process_index,
        "world_size": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "num_params": count_parameters(run.model),
        "params": ledger.bytes["params"],
        "grads": max(g["grads"] for g in grads.values()),
        "grads_at": {k: g["grads"] for k, g in grads.items()},
        "optim_state": sum(state.values()),
        "optim_state_by_dtype": state,
        "master": ledger.bytes.get("master", 0),
        "buffers": max(g["buffers"] for g in grads.values()),
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

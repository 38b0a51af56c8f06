"""What this rank really holds: bytes of parameters, gradients, optimizer state and DeepSpeed's buffers.

Logged once, in the first metrics row (`held_*_bytes`, the main process's), beside the planner's estimate
of the same parts (`dtrain plan`), so every run checks the planner on its own profile. Counted in bytes of
the unique storages behind the tensors (a view into a flat buffer counts the buffer once; no storage is
counted in two columns):

- params: the parameters as held locally: the tensor itself (DDP, ZeRO-1/2, whose parameters are views
  into DeepSpeed's flat groups), `p.ds_tensor` (ZeRO-3 partition), `DTensor.to_local()` (FSDP2).
- grads: `p.grad` (the local shard under FSDP2), `p.grad_accum`, and DeepSpeed's partitioned gradients
  (`averaged_gradients`, `grads_in_partition`, ZeRO-3's `grad_partitions_flat_buffer`), the larger of two
  instants: just before the first update (a wrapper on the optimizer's `step`, or the DeepSpeed engine's,
  which Accelerate calls inside `backward`) and, under DeepSpeed, at the end of backward, before its
  epilogue reduces and frees what is not the rank's own.
- optim: `dtrain.optim.optimizer_state_bytes` (exp_avg, exp_avg_sq, step) on the live optimizer.
- master: DeepSpeed's fp32 master partition when it is a separate copy.
- buffers: DeepSpeed's reduce buckets alive at those instants (claimed before the gradients, since ZeRO-1/2
  gradients live inside them during backward). DDP's own buckets live in C++ and are not visible here.
"""

from __future__ import annotations


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

    def __init__(self) -> None:
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


class HeldBytes:
    """Measures this rank's gradients at the first update (then takes its wrappers off again) and the
    rest when asked, after the step: `row()` for the first metrics row."""

    def __init__(self, accelerator, model, optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.ds_optimizer = None
        self.grads: dict[str, tuple[int, int]] = {}  # instant -> (grads, buffers)
        self.undo: list = []
        if accelerator.distributed_type.name == "DEEPSPEED":
            engine = accelerator.deepspeed_engine_wrapped.engine
            self.ds_optimizer = engine.optimizer
            self._before(engine, "step", "update")  # Accelerate's backward() runs engine.backward, then step
            if hasattr(self.ds_optimizer, "independent_gradient_partition_epilogue"):
                self._before(self.ds_optimizer, "independent_gradient_partition_epilogue", "backward_end")
        else:
            self._before(optimizer, "step", "update")

    def _before(self, owner, name: str, instant: str) -> None:
        original = getattr(owner, name)
        had_own = name in vars(owner)

        def wrapped(*args, **kwargs):
            self._measure_grads(instant)
            if instant == "update":
                self.release()
            return original(*args, **kwargs)

        setattr(owner, name, wrapped)
        self.undo.append(lambda: setattr(owner, name, original) if had_own else delattr(owner, name))

    def release(self) -> None:
        """Put the wrapped methods back: the measurement costs nothing after the first step."""
        for undo in reversed(self.undo):
            undo()
        self.undo = []

    def _measure_grads(self, instant: str) -> None:
        ledger = Ledger()
        ledger.claim("params", param_tensors(self.model))
        ledger.claim("buffers", bucket_tensors(self.ds_optimizer) if self.ds_optimizer is not None else ())
        ledger.claim("grads", grad_tensors(self.model, self.ds_optimizer))
        self.grads[instant] = (ledger.bytes["grads"], ledger.bytes["buffers"])

    def measure(self) -> dict[str, int]:
        """params, grads, optim, master, buffers (bytes on this rank), after at least one update."""
        from dtrain.optim import optimizer_state_bytes

        ledger = Ledger()
        ledger.claim("params", param_tensors(self.model))
        ledger.claim("master", master_tensors(self.ds_optimizer))
        grads = max((g for g, _ in self.grads.values()), default=0)
        buffers = max((b for _, b in self.grads.values()), default=0)
        return {
            "params": ledger.bytes["params"],
            "grads": grads,
            "optim": sum(optimizer_state_bytes(self.optimizer).values()),
            "master": ledger.bytes.get("master", 0),
            "buffers": buffers,
        }

    def row(self) -> dict[str, int]:
        self.release()
        return {f"held_{k}_bytes": v for k, v in self.measure().items()}

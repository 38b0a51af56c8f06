"""Asynchronous checkpoints (`--checkpoint.async_save true`): a save stages a snapshot and returns.

At a save step every rank takes what the checkpoint will hold: the RNG, schedule, scaler and train state
the Checkpointer adds are copied at once, and the model and optimizer tensors are staged to host memory by
DCP's own stager in its staging thread, while the next step's forward and backward run. Only the next
optimizer update waits for that copy to end (a step pre-hook on the optimizer: the update is the first
thing that changes those tensors), so the snapshot is still the state of the save step. A writer thread
then runs the whole commit protocol on that snapshot: the per-rank DCP files, the agreement that every
rank's write succeeded, the fsyncs, the rename, the marker and the rotation. It talks to the other ranks'
writers over a gloo group of its own (DCP's collectives and the agreements), separate from the training
group and from the stop-request group: a shared group interleaves collectives of two threads (gloo
"collective mismatch" and aborts, measured). Its agreements reduce CPU tensors on that group, so nothing
in the step waits on the device for them.

At most one save is in flight. `wait` joins it and re-raises its failure as the one line a synchronous
save gives; the Checkpointer calls it before the next save, a load (rollback, resume), the end of
training, a stop request and a halt, so the loop never does.

Staging keeps one extra copy of this rank's model and optimizer state in host memory (reused by the next
save; pinned on CUDA). On CUDA the copy is a blocking one from the staging thread on the default stream:
it is ordered after the save step's update and before the next one, and holds the host of neither.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future

# light at import (the launch side reads REFUSED_UNDER_DEEPSPEED): torch is imported where it is used
REFUSED_UNDER_DEEPSPEED = (
    "--checkpoint.async_save true is for the DCP profiles (single_gpu, ddp, fsdp, hsdp): DeepSpeed 0.19's own "
    "decoupled checkpoint writers do not run here; use --checkpoint.async_save false under DeepSpeed"
)
# Test-only: seconds each writer sleeps once its files are written, before the ranks agree, so that a test
# can kill a rank or signal the job while a background save is in flight (tests/test_guards.py,
# tests/test_signals.py). Unset in real runs.
DELAY_ENV = "DTRAIN_TEST_SAVE_DELAY_S"


class BackgroundSave:
    """The writer thread, its process group and its stager. Every rank builds one (collectively)."""

    def __init__(self, accelerator, timeout_s: float):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        cuda = accelerator.device.type == "cuda"
        self.group = None
        if accelerator.num_processes > 1:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        # staged in the stager's own thread, into storages kept for the next save; pinned host memory
        # where there is a device to copy from
        self.stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=cuda,
                use_shared_memory=False,
                use_async_staging=True,
                use_non_blocking_copy=False,
            )
        )
        self.staging: Future | None = None  # the copy in progress, until the next update has waited for it
        self.held_s = 0.0  # how long that update waited
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.delay_s = float(os.environ.get(DELAY_ENV, "0") or 0)

    def hold_updates(self, optimizer) -> None:
        """Make every update of `optimizer` (Accelerate's wrapper or a torch optimizer) wait for the copy."""
        getattr(optimizer, "optimizer", optimizer).register_step_pre_hook(self._before_update)

    def stage(self, state_dict: dict) -> Future:
        """Start copying the tensors of `state_dict` to host memory (DTensors stay DTensors, their local
        shards copied); the Future gives the copy. Its error, if any, is the writer's to report."""
        self.held_s = 0.0
        copies: dict[tuple, object] = {}
        plain = _without_subclasses(state_dict, copies)
        staged = self.stager.stage(plain)
        assert isinstance(staged, Future)  # asynchronous staging returns a Future
        self.staging = _joined(staged, copies) if copies else staged
        return self.staging

    def _before_update(self, *_) -> None:
        if self.staging is None:
            return
        started = time.perf_counter()
        futures.wait([self.staging])
        self.held_s = time.perf_counter() - started
        self.staging = None

    def start(self, job: Callable[[], None]) -> None:
        """Run `job` (write, agree, commit) in the writer thread."""
        assert self.thread is None, "a background save is already in flight"

        def run() -> None:
            try:
                job()
            except BaseException as exc:  # re-raised on the training thread by wait()
                self.failure = exc

        self.thread = threading.Thread(target=run, name="dtrain-checkpoint-writer", daemon=True)
        self.thread.start()

    def written(self) -> None:
        """Called by the writer between its files and the agreement (the test-only pause, when set)."""
        if self.delay_s:
            time.sleep(self.delay_s)

    def wait(self) -> None:
        """Until the save in flight is committed (or has failed on every rank: then its error, here)."""
        if self.thread is None:
            return
        self.thread.join()
        self.thread = None
        failure, self.failure = self.failure, None
        if failure is not None:
            raise failure

    def agree(self, failed: bool) -> bool:
        """Whether any rank's writer failed: a CPU all-reduce on the writer's own group."""
        import torch

        flag = torch.tensor([1 if failed else 0], dtype=torch.int32)
        if self.group is not None:
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())  # a CPU tensor: no device sync


# Tensor subclasses (torchao's 8-bit optimizer state, OptimState8bit) implement neither new_empty, which
# the stager allocates its host copies with, nor a copying clone. They are copied here, on the training
# thread, from their inner tensors: a few bytes per parameter (codes and scales), against the 8 of AdamW.


def _is_subclass(t) -> bool:
    import torch
    from torch.distributed.tensor import DTensor

    while isinstance(t, DTensor):  # a DTensor is staged as its local shard
        t = t._local_tensor
    return type(t) not in (torch.Tensor, torch.nn.Parameter)


def _host_copy(t):
    """A host copy of `t` sharing no memory with it, rebuilt from its inner tensors where it has some."""
    import torch
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not isinstance(t, torch.Tensor):  # a DTensor's device mesh, among its inner attributes
        return t
    if is_traceable_wrapper_subclass(t):
        names, ctx = t.__tensor_flatten__()
        inner = {name: _host_copy(getattr(t, name)) for name in names}
        return type(t).__tensor_unflatten__(inner, ctx, t.size(), t.stride())
    return t.detach().to("cpu", copy=True)


def _mapped(node, leaf: Callable, path: tuple = ()):
    """`node`'s dicts and lists rebuilt (new containers: the stager keeps its own for reuse), each other
    value replaced by `leaf(path, value)`."""
    if isinstance(node, dict):
        return {k: _mapped(v, leaf, (*path, k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_mapped(v, leaf, (*path, i)) for i, v in enumerate(node)]
    return leaf(path, node)


def _without_subclasses(state: dict, copies: dict) -> dict:
    """`state` with every tensor subclass left out (None); their host copies go in `copies`, by path."""
    import torch

    def leaf(path: tuple, value):
        if isinstance(value, torch.Tensor) and _is_subclass(value):
            copies[path] = _host_copy(value)
            return None
        return value

    return _mapped(state, leaf)


def _joined(staged: Future, copies: dict) -> Future:
    """A Future of the staged state with the copies put back, done when the staging is."""
    joined: Future = Future()

    def done(f: Future) -> None:
        try:
            joined.set_result(_mapped(f.result(), lambda path, value: copies.get(path, value)))
        except BaseException as exc:
            joined.set_exception(exc)

    staged.add_done_callback(done)
    return joined


def staging_line(model, optimizer_name: str) -> str:
    """The start-up note of a run that saves in the background: the host memory its snapshot takes on this
    rank, estimated before the first step as the planner does (this rank's shards of the weights, and the
    optimizer state they will have)."""
    from dtrain.plan.memory import optimizer_state_bytes

    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    weights = sum(t.numel() * t.element_size() for t in local)
    state = optimizer_state_bytes(
        optimizer_name,
        [tuple(t.shape) for t, p in zip(local, model.parameters(), strict=True) if p.requires_grad],
    )
    return (
        f"dtrain: --checkpoint.async_save: each save stages a host copy of this rank's weights and optimizer "
        f"state, about {(weights + state) / 2**20:,.0f} MiB of CPU memory per rank, then trains on while it is written"
    )

"""Guards for long runs: a non-finite step is found on any rank and agreed by all, and a rank that dies or
hangs ends the job instead of holding the others in a collective forever.

Non-finite steps. Before every optimizer step each rank checks its loss and the gradient norm (the norm
is global already: DDP averaged the gradients, FSDP and ZeRO reduced it over ranks) and the verdict is
agreed in one all-reduce. Reading it is the step's one host sync, the same one torch's GradScaler makes
under fp16 and Megatron makes for its found-inf flag: the update cannot be applied or dropped without
knowing it. Every rank then takes the same action (`--train.nonfinite`, see train.take_step).

fp16: a gradient that overflows is the grad scaler's business (it skips the update and lowers the scale,
counted as `skipped_steps`), not a fault; a non-finite loss still is one.

DeepSpeed steps inside `accelerator.backward`, before dtrain can look. Its ZeRO optimizer checks the
global gradient norm itself (stages 1 and 2: bf16 with `bf16.check_grad_overflow`, on by default, and
fp32; stage 3 always) and on a non-finite norm leaves parameters and optimizer state untouched and
zeroes the gradients, on every rank alike since the norm is global. dtrain reads that outcome
(`step_was_skipped`) as the gradient half of its verdict, and runtime.configure_deepspeed refuses the
settings that switch the check off. A non-finite loss always comes with non-finite gradients (its
backward carries the NaN into every parameter it reached), so the engine has skipped that step too.
"""

from __future__ import annotations

NONFINITE_EXIT_CODE = 65  # EX_DATAERR: halted on a non-finite step; the newest checkpoint is the resume point
RANK_LOST_EXIT_CODE = 69  # EX_UNAVAILABLE: another rank died or hung in a collective (collective_timeout_s)


class RunHalted(Exception):
    """The run stopped itself on every rank (the reason is already logged): exit with `code`."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class NonfiniteGuard:
    """The agreed verdict on one optimizer step. Built on every rank; `faulted` is a collective."""

    def __init__(self, accelerator):
        self.acc = accelerator
        self.fp16 = accelerator.mixed_precision == "fp16"
        self.engine_steps = accelerator.distributed_type.name == "DEEPSPEED"  # stepped inside backward

    def faulted(self, loss_sum, grad_norm, optimizer) -> bool:
        """Whether any rank saw a non-finite loss or gradient norm in this step. Called at the gradient
        sync, after clipping measured the norm and before `optimizer.step()`."""
        import torch

        bad = ~torch.isfinite(loss_sum)
        if not self.fp16:  # fp16: an overflowing gradient is skipped by the grad scaler, not a fault
            if self.engine_steps:
                bad = bad | bool(optimizer.step_was_skipped)  # the engine's own global-norm check
            elif grad_norm is not None:
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor, the same on every rank
                    grad_norm = grad_norm.full_tensor()
                bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=bad.device))
        bad = bad.to(torch.float32).reshape(1)
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad, reduction="sum")  # the one all-reduce: every rank gets the verdict
        return bool(bad.item() > 0)  # the one host read per step

    def discard(self, optimizer) -> None:
        """Drop this step's gradients without an update. Under fp16 the scaler has unscaled them (clipping
        needs that) and would refuse the next unscale: forget that, as its own `update()` does, without
        changing the scale, which only a real overflow should move."""
        scaler = self.acc.scaler
        if scaler is not None and not self.engine_steps:
            scaler._per_optimizer_states.clear()  # torch.amp.GradScaler: no public reset of this record
        optimizer.zero_grad(set_to_none=True)


def deepspeed_check_off(ds: dict, precision: str | None) -> str | None:
    """The DeepSpeed setting, if any, that would make the engine apply a NaN/Inf gradient instead of
    skipping the step (fp16 aside: its loss scaler always checks). Used by `dtrain launch`'s pre-flight
    and again in every rank, for a plain `accelerate launch`."""
    if precision == "fp16":
        return None
    for section, key in (("bf16", "check_grad_overflow"), ("zero_optimization", "compute_grad_norm")):
        if (ds.get(section) or {}).get(key) is False:
            return (
                f"sets {section}.{key}=false, so DeepSpeed would apply a NaN/Inf gradient instead of skipping "
                "the step; remove it from the JSON (dtrain's --train.nonfinite relies on that check)"
            )
    return None


def is_lost_rank(exc: BaseException) -> bool:
    """A collective failed because another rank died (its connection closed) or hung past the timeout."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):  # NCCL and the store raise these
        return True
    # gloo raises plain RuntimeErrors from its transport: "...gloo/transport/tcp/pair.cc... Connection
    # reset by peer" when the peer died, "...unbound_buffer.cc... Timed out waiting 10000ms" when it hung
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and "gloo" in text and ("connection" in text or "timed out" in text)

"""Which profile, micro-batch and accumulation to launch with: the least sharding that fits.

The recipe's optimizer and global batch are kept (switching either would change the training): only how
the per-process batch is split into micro-batches, which profile holds the state, and whether memory
savers are needed change. Preference, in this order: no memory saver over the chunked loss over gradient
checkpointing (each only when nothing fits without it); no offload unless nothing else fits; then the
least sharding (single_gpu, ddp, zero1, zero2, hsdp (sharded inside a node, several nodes), fsdp, zero3);
then the largest micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from dtrain.config import Config
from dtrain.plan.activations import ActivationModel
from dtrain.plan.memory import Estimate, Setting, estimate
from dtrain.plan.model import ModelShape

ORDER = (
    "single_gpu",
    "ddp",
    "zero1",
    "zero2",
    "hsdp",
    "fsdp",
    "zero3",
    "zero2_offload",
    "fsdp_offload",
    "zero3_offload",
)
CHUNK = 1024  # tokens per chunk when the planner turns the chunked loss on


@dataclass
class Candidate:
    """A profile as the planner can launch it (or the reason it cannot)."""

    name: str
    setting: Setting  # micro-batch etc. filled in per estimate
    refused: str | None = None

    @property
    def offloads(self) -> bool:
        return self.setting.offload_optimizer or self.setting.offload_params


@dataclass
class Row:
    """One line of the plan: a profile at the best setting it has (or its leanest, when none fits)."""

    candidate: Candidate
    estimate: Estimate | None
    fits: bool | None
    optimizer_note: str = ""  # the 8-bit rows: which optimizer this row swaps in


@dataclass
class Choice:
    estimate: Estimate
    savers: list[str]  # "gradient checkpointing", "chunked loss", only those the plan turned on


def divisors(n: int) -> list[int]:
    return sorted({d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}, reverse=True)


def saver_levels(cfg: Config) -> list[tuple[bool, int]]:
    """(gradient checkpointing, loss chunk) in the order they are tried; the recipe's own settings stay on."""
    gc = bool(cfg.model.gradient_checkpointing) or (
        cfg.model.gradient_checkpointing is None and cfg.peft.method == "qlora"
    )
    chunk = cfg.train.loss_chunk_size
    levels = [(gc, chunk), (gc, chunk or CHUNK), (True, chunk), (True, chunk or CHUNK)]
    return list(dict.fromkeys(levels))


def best_for(
    shape: ModelShape, acts: ActivationModel, cand: Candidate, per_process: int, device: float, levels
) -> Estimate | None:
    """The largest micro-batch that fits at the first saver level where any does."""
    for gc, chunk in levels:
        for mb in divisors(per_process):
            s = replace(
                cand.setting,
                micro_batch=mb,
                accumulation=per_process // mb,
                checkpointing=gc,
                loss_chunk=chunk,
            )
            e = estimate(shape, acts, s)
            if e.fits(device):
                return e
    return None


def leanest(shape: ModelShape, acts: ActivationModel, cand: Candidate, per_process: int, levels) -> Estimate:
    gc, chunk = levels[-1]
    s = replace(cand.setting, micro_batch=1, accumulation=per_process, checkpointing=gc, loss_chunk=chunk)
    return estimate(shape, acts, s)


def recommend(
    shape: ModelShape,
    acts: ActivationModel,
    cands: list[Candidate],
    per_process: int,
    device: float,
    cfg: Config,
) -> tuple[list[Row], Choice | None]:
    """Every candidate's row, and the choice (None when nothing fits)."""
    levels = saver_levels(cfg)
    rows, choice = [], None
    usable = [c for c in cands if not c.refused]
    for offload in (False, True):
        for gc, chunk in levels:
            for cand in (c for c in usable if c.offloads == offload):
                e = best_for(shape, acts, cand, per_process, device, [(gc, chunk)])
                if e is not None and choice is None:
                    choice = Choice(e, _savers(cfg, e.setting))
    for cand in cands:
        if cand.refused:
            rows.append(Row(cand, None, None))
            continue
        e = best_for(shape, acts, cand, per_process, device, levels)
        rows.append(Row(cand, e or leanest(shape, acts, cand, per_process, levels), e is not None))
    return rows, choice


def _savers(cfg: Config, s: Setting) -> list[str]:
    on = []
    if s.checkpointing and not cfg.model.gradient_checkpointing:
        on.append("gradient checkpointing")
    if s.loss_chunk and not cfg.train.loss_chunk_size:
        on.append("chunked loss")
    return on


def what_would_fit(
    shape: ModelShape,
    acts: ActivationModel,
    cands: list[Candidate],
    per_process: int,
    device: float,
    cfg: Config,
) -> str:
    """For a model that fits nowhere: what the leanest setting needs, and what would make one fit."""
    levels = saver_levels(cfg)
    pool = [c for c in cands if not c.refused]
    if not pool:
        return "no profile can run this recipe (see the refusals above)"
    lean = min((leanest(shape, acts, c, per_process, levels) for c in pool), key=lambda e: e.total)
    hints = [
        f"the leanest setting ({lean.setting.profile}, micro-batch 1, gradient checkpointing, chunked loss) "
        f"needs {lean.total / 2**30:.1f} GiB per GPU"
    ]
    sharded = [c for c in pool if c.setting.kind in ("fsdp", "deepspeed") and not c.offloads]
    if sharded:  # more GPUs divide the states of a sharding profile, nothing else
        e = leanest(shape, acts, sharded[-1], per_process, levels)
        states = e.weights + e.gradients + e.optimizer
        room = 0.9 * device - (e.total - states)
        if room > 0:
            gpus = math.ceil(states * e.setting.shard / room)
            hints.append(f"{e.setting.profile} would fit on {gpus} GPUs of this size (--gpus x --nodes)")
    hints.append(f"or on GPUs with {math.ceil(lean.total / 0.9 / 2**30)} GiB")
    if cfg.peft.method == "none":
        hints.append("or train adapters only (--peft.method lora, or qlora for a 4-bit base)")
    if lean.activations + lean.logits > 0.5 * lean.total:
        hints.append("or a shorter --data.max_length (activations are most of it)")
    return "; ".join(hints)

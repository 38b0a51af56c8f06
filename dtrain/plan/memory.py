"""The estimated peak memory of one GPU under one profile, by part, from what each engine really holds.

Every formula is in `FORMULAS` (printed as the plan's footnote). N is the number of processes that shard
(all of them; replicas do not divide anything); P every parameter, T the trained ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dtrain.plan.activations import ActivationModel
from dtrain.plan.model import ModelShape

GiB = 2**30
CUDA_CONTEXT = 0.75 * GiB  # CUDA context, cuBLAS workspace, kernels: what torch holds before any tensor
NCCL = 0.5 * GiB  # NCCL's communicator buffers, once there is more than one process
PARTS = ("weights", "gradients", "optimizer", "activations", "logits", "buffers", "overhead")

FORMULAS = [
    "N: the ranks the states are sharded over, all of them (hsdp: dp_shard, the processes of one node, "
    "one replica per node)",
    "weights: P x bytes of --model.dtype, / N under fsdp, hsdp and zero3, 0 when offloaded; DeepSpeed holds them "
    "in the compute dtype (2 bytes under bf16/fp16); single/ddp under bf16/fp16 add autocast's "
    "compute-dtype copies of the matmul weights (decoder linears and the head), alive from forward to "
    "backward; QLoRA: decoder linears in NF4 (0.516 bytes/param with double quantisation), the rest as loaded",
    "gradients: T x bytes of the trained weights; / N under fsdp, hsdp, zero1, zero2, zero3 (DeepSpeed keeps only "
    "the rank's partition at the update, stage 1 too); 0 when offloaded",
    "optimizer: T x state bytes (adamw 8; adamw_8bit/paged/ao 2 + an fp32 scale per 256, 8 for tensors under "
    "4096 elements; adafactor its row and column factors; sgd 4 with momentum), / N when sharded; DeepSpeed "
    "adds its fp32 master copy, 4T/N; 0 when offloaded",
    "activations: measured saved-for-backward bytes (see above) x micro-batch; with gradient checkpointing "
    "the layer inputs plus one layer's recompute",
    "logits: micro-batch x max_length x vocab x 12 bytes (the logits, their fp32 copy, the saved "
    "log-softmax and their gradients at the peak, measured); with --train.loss_chunk_size C: C x vocab x 14 "
    "(15 under bf16/fp16), one chunk recomputed in backward",
    "buffers: ddp T x gradient bytes (DDP's buckets copy the gradients); DeepSpeed stage 1/2 "
    "reduce_bucket_size elements x 2 bytes under bf16/fp16, else 4 (x2 with overlap_comm), stage 3 the "
    "largest layer gathered plus stage3_prefetch_bucket_size and reduce_bucket_size ('auto': 0.9h^2 and "
    "h^2, as Accelerate fills them); fsdp and hsdp two gathered layers (computing and prefetched) and one layer's "
    "unsharded gradients",
    f"overhead: fixed {CUDA_CONTEXT / GiB:.2f} GiB (CUDA context, cuBLAS workspace) + {NCCL / GiB:.2f} GiB "
    "(NCCL) with more than one process; not measured here, stated",
    "fits: total <= 90% of the GPU's memory (10% headroom for the caching allocator's fragmentation)",
]


@dataclass(frozen=True)
class Setting:
    """One configuration to estimate: a profile and how the batch and memory savers are set."""

    profile: str
    kind: str  # single, ddp, fsdp, deepspeed
    zero_stage: int | None
    offload_optimizer: bool
    offload_params: bool
    processes: int
    shard: int  # the ranks the sharded states are split over: all of them, hsdp's dp_shard (a node)
    micro_batch: int
    accumulation: int
    seq: int
    precision: str  # no, bf16, fp16
    optimizer: str
    checkpointing: bool
    loss_chunk: int
    ds_zero: dict  # the profile's zero_optimization block


@dataclass
class Estimate:
    setting: Setting
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    buffers: float
    overhead: float

    @property
    def total(self) -> float:
        return sum(getattr(self, p) for p in PARTS)

    def fits(self, device_bytes: float | None) -> bool | None:
        return None if device_bytes is None else self.total <= 0.9 * device_bytes

    def to_dict(self) -> dict:
        s = asdict(self.setting)
        s.pop("ds_zero")
        return {**s, **{p: round(getattr(self, p)) for p in PARTS}, "total": round(self.total)}


def optimizer_state_bytes(name: str, shapes: list[tuple[int, ...]]) -> float:
    """Bytes of optimizer state for parameters of these shapes (not counting DeepSpeed's master copy)."""
    total = 0.0
    for shape in shapes:
        n = math.prod(shape)
        if name == "adamw":
            total += 8 * n
        elif name in ("adamw_8bit", "paged_adamw_8bit", "adamw_8bit_ao"):
            total += 8 * n if n < 4096 else (2 + 8 / 256) * n
        elif name == "adafactor":
            total += (
                4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]) if len(shape) >= 2 else 4 * n
            )
        elif name == "sgd":
            total += 4 * n
    return total


def logits_bytes(tokens: int, vocab: int, compute: int, chunk: int = 0) -> float:
    """Peak bytes of the head's output and the loss over forward and backward, as measured with the CPU
    profiler on dtrain's own loss functions (tests/test_plan.py): 12.0 bytes per token and vocabulary entry
    in fp32 and 12.1 in bf16 (the logits, their fp32 copy, the saved log-softmax, then their gradients);
    one chunk of the chunked loss, recomputed in backward, 13.7 in fp32 and 14.7 in bf16."""
    if chunk and chunk < tokens:
        return float(chunk * vocab * (14 if compute == 4 else 15))
    return float(tokens * vocab * 12)


def _ds_size(zero: dict, key: str, auto: float, default: float) -> float:
    value = zero.get(key, default)
    return auto if value == "auto" else float(value)


def estimate(shape: ModelShape, acts: ActivationModel, s: Setting) -> Estimate:
    n = s.shard
    mixed = s.precision in ("bf16", "fp16")
    model_bytes = shape.dtype_bytes
    compute = 2 if mixed else model_bytes
    ds = s.kind == "deepspeed"
    sharded_states = s.kind == "fsdp" or ds
    t = shape.trainable

    # weights
    if ds:
        weights = shape.params * (2 if mixed else 4) / (n if s.zero_stage == 3 else 1)
    elif s.kind == "fsdp":
        weights = shape.weight_bytes / n
    else:
        weights = shape.weight_bytes
        if mixed and model_bytes == 4:
            weights += compute * (shape.linear + shape.vocab * shape.hidden)  # autocast's copies
    if s.offload_params:
        weights = 0.0

    # gradients, optimizer state
    grad_bytes = (2 if mixed else 4) if ds else model_bytes
    gradients = t * grad_bytes / (n if sharded_states else 1)
    state = optimizer_state_bytes(s.optimizer, shape.trainable_shapes)
    if ds:
        state += 4 * t  # the fp32 master copy
    optimizer = state / (n if sharded_states else 1)
    if s.offload_optimizer:
        gradients, optimizer = (0.0, 0.0)

    # activations and logits
    activations = acts.bytes(s.micro_batch, s.seq, s.checkpointing)
    logits = logits_bytes(s.micro_batch * s.seq, shape.vocab, compute, s.loss_chunk)

    # communication buffers
    h2 = float(shape.hidden * shape.hidden)
    buffers: float = 0.0
    if s.kind == "ddp":
        buffers = t * grad_bytes
    elif s.kind == "fsdp":
        unit = shape.largest_unit * compute
        buffers = 2 * unit + shape.largest_unit * compute
    elif ds and s.zero_stage in (1, 2):
        bucket = _ds_size(s.ds_zero, "reduce_bucket_size", h2, 5e8)
        buffers = bucket * grad_bytes * (2 if s.ds_zero.get("overlap_comm") else 1)
    elif ds:
        prefetch = _ds_size(s.ds_zero, "stage3_prefetch_bucket_size", 0.9 * h2, 5e7)
        bucket = _ds_size(s.ds_zero, "reduce_bucket_size", h2, 5e8)
        buffers = (shape.largest_unit + prefetch) * (2 if mixed else 4) + bucket * grad_bytes
    overhead = CUDA_CONTEXT + (NCCL if s.processes > 1 else 0.0)
    return Estimate(s, weights, gradients, optimizer, activations, logits, buffers, overhead)


def staging_bytes(shape: ModelShape, acts: ActivationModel, s: Setting) -> float:
    """Host memory per process that --checkpoint.async_save adds: one copy of the weights and optimizer
    state the process holds (wherever they live: offloaded states are staged too)."""
    from dataclasses import replace

    e = estimate(shape, acts, replace(s, offload_optimizer=False, offload_params=False))
    return e.weights + e.optimizer

"""The benchmark's modes (bench/run.py --quick, --gpu, or neither: full): what each section runs and
how often."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Plan:
    mode: str
    max_length: int = 256
    train_examples: int = 2000
    sections: tuple[str, ...] = ("overhead", "throughput", "memory", "startup", "data", "checkpoint")
    # (batch, warm-up steps, measured steps, log every, repeats)
    overhead: tuple[int, int, int, int, int] = (8, 20, 300, 20, 5)
    throughput: tuple[int, int, int, int, int] = (16, 3, 24, 3, 5)
    gpt2_batch: int = 8  # the GPT-2 throughput cases: examples/step (the user report's batch)
    optimizers: tuple[str, ...] = ("adamw", "adamw_8bit", "adamw_8bit_ao")
    optim_steps: int = 3
    profiles: tuple[str, ...] = ("ddp", "fsdp", "hsdp", "zero1", "zero2", "zero3")
    bigvocab: tuple[int, int] = (8, 3)  # batch, steps
    checkpoint: tuple[int, int, int] = (12, 4, 2)  # steps, a save every, ranks (the "ckpt" model)
    startup_repeats: int = 3
    train_imports: bool = True  # also -X importtime on the training run (full mode)
    timeout: int = 900
    threads: int | None = None  # OMP_NUM_THREADS of one-process cases; None: all cores (GPU: untouched)
    models: dict = field(default_factory=dict)
    gpu: dict = field(default_factory=dict)


CPU_MODELS = {
    "tiny": {"hidden": 32, "intermediate": 64, "layers": 2, "heads": 2},  # overhead: the loop shows
    "bench": {"hidden": 256, "intermediate": 1024, "layers": 4, "heads": 4},  # attention/MLP dominate
    "bigvocab": {"hidden": 64, "intermediate": 256, "layers": 2, "heads": 2, "vocab_size": 128256},
    # a user's GPT-2 directory: BPE trained on Python files, tied head, dropout 0.1 (throughput section)
    "gpt2": {"family": "gpt2", "hidden": 256, "layers": 4, "heads": 4, "vocab_size": 8192, "documents": 600},
    # the checkpoint section: >= 100M parameters (134M: 12 x 768 wide, a 32k vocabulary, untied)
    "ckpt": {"hidden": 768, "intermediate": 2048, "layers": 12, "heads": 12, "vocab_size": 32000},
}
# quick: the GPT-2 cases run too, on a tiny model and corpus (they prove the case works, judge nothing)
QUICK_MODELS = {
    **CPU_MODELS,
    "gpt2": {"family": "gpt2", "hidden": 64, "layers": 2, "heads": 2, "vocab_size": 1024, "documents": 40},
    "ckpt": {"hidden": 64, "intermediate": 256, "layers": 2, "heads": 2},
}

PLANS = {
    "full": Plan("full", models=CPU_MODELS),
    "quick": Plan(
        "quick",
        train_examples=400,
        overhead=(8, 2, 3, 1, 1),
        throughput=(8, 1, 2, 1, 1),
        optim_steps=2,
        profiles=("zero3",),  # the probe works; every profile's bytes: tests/test_plan.py, shared runs
        bigvocab=(8, 2),
        checkpoint=(6, 2, 2),  # a periodic save committed before the last rows: its times are logged
        startup_repeats=1,
        train_imports=False,
        timeout=300,
        threads=1,  # judges nothing: one thread is steadier on a busy CI runner than two spinning ones
        models=QUICK_MODELS,
    ),
    "gpu": Plan(
        "gpu",
        max_length=2048,
        train_examples=3000,
        sections=("gpu",),
        timeout=600,
        models={
            "gpu1b": {
                "hidden": 2048,
                "intermediate": 5632,
                "layers": 16,
                "heads": 16,
                "vocab_size": 32000,
                "save_dtype": "bfloat16",
            }
        },
        # tokens per optimizer step, warm-up (compile), measured steps, log every; 8-bit runs: steps, rows
        gpu={"tokens_per_step": 12288, "warmup": 10, "measure": 30, "log_every": 10, "check_steps": 16},
    ),
}

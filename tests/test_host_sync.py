"""The training step copies one value to the host per optimizer step, and no other: the non-finite
verdict every rank agreed on (dtrain/guards.py), which decides whether the update is applied. No other
`.item()`, `.tolist()`, `float(t)`, `int(t)` or `bool(t)` between logging steps (each is a device sync on a
GPU). One exception, counted exactly: transformers' packed-sequence detection reads one boolean per
forward (sdpa, eager; not under torch.compile), because training forwards pass no cache and no attention
mask.

On this CPU machine a sync cannot be observed directly, so the test counts the Python-level calls
that would cause one, over real `train_step` calls and the device-side metric accumulation.
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback
from pathlib import Path

import pytest
import torch
from conftest import fresh_accelerator, tiny_llama

from dtrain.config import OptimConfig
from dtrain.data import IGNORE_INDEX, Collator
from dtrain.guards import NonfiniteGuard
from dtrain.metrics import StepStats
from dtrain.optim import build_optimizer
from dtrain.tasks import build_char_tokenizer
from dtrain.train import train_step

GUARDS = str(Path(__file__).resolve().parent.parent / "dtrain" / "guards.py")
SYNCING = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


@contextlib.contextmanager
def count_host_copies():
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0].filename
            # torch's CPU optimizers keep their step counter on the host by design (no device sync);
            # on CUDA dtrain uses fused AdamW, which keeps it on the device. The training thread only: a
            # background checkpoint writer's copies hold up no step.
            if (
                f"torch{os.sep}optim{os.sep}" not in caller
                and threading.current_thread() is threading.main_thread()
            ):
                calls.append(f"{name} from {caller}")
            return fn(self, *args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def test_training_steps_between_logs_make_no_host_copies():
    accelerator = fresh_accelerator(2)
    tok = build_char_tokenizer()
    model = tiny_llama(tok)
    optimizer = build_optimizer(model, OptimConfig(), accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    collate = Collator(tok.pad_token_id)
    rows = [
        {"input_ids": list(range(4, 4 + n)), "labels": [IGNORE_INDEX] * 3 + list(range(7, 4 + n))}
        for n in (8, 12, 9, 15)
    ]
    window = [collate(rows[:2]), collate(rows[2:])]
    stats = StepStats(accelerator.device)
    before = [p.detach().clone() for p in model.parameters()]
    guard = NonfiniteGuard(accelerator)
    with count_host_copies() as calls:
        for _ in range(3):  # clipping on
            step = train_step(accelerator, model, optimizer, window, 1.0, guard)
            stats.add(step.loss_sum, step.targets, step.tokens, step.positions)
    assert_only_verdict_and_detection(calls, steps=3, forwards=3 * len(window))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # it trained
    with count_host_copies() as calls:
        totals = stats.pop(accelerator)  # the logging step is where the one copy happens
    assert calls and totals["targets"] == 3 * sum(len(r["input_ids"]) - 3 for r in rows)


def test_packed_steps_make_no_host_copies_of_their_own():
    """The packed path: dtrain adds no host copy. transformers' packed-sequence detection
    (masking_utils.find_packed_sequence_indices, `if (...).all()`) reads one boolean per forward (per
    micro-batch, not per layer) with sdpa and eager; under torch.compile it is skipped. Counted exactly,
    so a new sync on this path (in dtrain or per layer) fails here."""
    from dtrain.data.collate import PackedCollator

    accelerator = fresh_accelerator(2)
    tok = build_char_tokenizer()
    model = tiny_llama(tok)
    optimizer = build_optimizer(model, OptimConfig(), accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    rows = [
        {"input_ids": list(range(4, 4 + n)), "labels": [IGNORE_INDEX] * 3 + list(range(7, 4 + n))}
        for n in (8, 12, 9, 15)
    ]
    pack = PackedCollator(tok.pad_token_id)
    window = [pack([rows[:2], rows[2:3]]), pack([rows[3:]])]
    with count_host_copies() as calls:
        for _ in range(2):
            train_step(accelerator, model, optimizer, window, 1.0, NonfiniteGuard(accelerator))
    assert_only_verdict_and_detection(calls, steps=2, forwards=2 * len(window))


def assert_only_verdict_and_detection(calls: list[str], steps: int, forwards: int) -> None:
    """From dtrain, only the non-finite verdict, once per optimizer step (not per micro-batch); from
    transformers only its packed-sequence detection, once per forward. (It runs on every forward without
    a cache and without a mask, packed or not: dtrain passes use_cache=False, so that unpacked
    right-padded batches get it too.)"""
    ours = [c for c in calls if f"site-packages{os.sep}" not in c]
    verdicts = [c for c in ours if c == f"item from {GUARDS}"]
    assert ours == verdicts and len(verdicts) == steps, f"host copies in dtrain's step: {ours}"
    detection = [c for c in calls if c.endswith(f"transformers{os.sep}masking_utils.py")]
    assert len(calls) - steps == len(detection) == forwards, calls


@pytest.mark.parametrize("saves", ["none", "async"])
def test_the_loop_body_with_profiling_off_makes_no_host_copies_of_its_own(saves, tmp_path):
    """Not only `train_step`: the loop's whole step (the profiler hooks, the data window from the real
    loader and collator, take_step's bookkeeping, the stop agreement) on a run built by the real
    `setup`, with --log.profile_steps null. The same copies as train_step alone, none more. `async`: the
    loop also saves at every step with --checkpoint.async_save, which stages a snapshot and returns: its
    writer thread agrees on CPU tensors, and the save step makes no host copy on the training thread."""
    from conftest import TINY

    from dtrain.config import parse_config
    from dtrain.profiling import OFF
    from dtrain.train import setup, take_step

    fresh_accelerator()  # Accelerate's singletons from earlier tests: setup builds its own accelerator
    argv = [*TINY, "--output_dir", str(tmp_path / "run"), "--train.gradient_accumulation_steps", "2"]
    if saves == "async":
        argv += ["--checkpoint.async_save", "true"]
    run = setup(parse_config(argv), argv)
    state = run.state
    assert run.profiler is OFF

    def loop_body():  # main()'s loop body, less the log, eval and save of their own steps
        run.profiler.begin(state.step + 1)
        window = run.next_window()
        take_step(run, window)
        run.profiler.end(state.step)
        run.stop.agreed()
        if saves == "async":
            run.checkpointer.save()  # the previous step's save lands first (at most one in flight)

    try:
        run.model.train()
        loop_body()  # the first builds the epoch's order: a CPU generator's permutation, once per epoch
        with count_host_copies() as calls:
            for _ in range(3):
                loop_body()
        run.checkpointer.wait()
    finally:
        run.stop.close()  # give the signal handlers back to pytest
    assert state.step == 4
    if saves == "async":
        committed = sorted(p.name for p in run.checkpointer.committed())
        assert committed == ["step-00000003", "step-00000004"], committed  # keep_last 2 of the 4
    assert_only_verdict_and_detection(calls, steps=3, forwards=3 * 2)

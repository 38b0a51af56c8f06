"""dtrain's training script: one Accelerate loop, unchanged under every launch profile.

    python dtrain/train.py                                      # embedded default run (CPU or one GPU)
    python dtrain/train.py --config my_recipe.yaml --optim.lr 1e-5
    accelerate launch --num_processes 4 dtrain/train.py --config my_recipe.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 dtrain/train.py   # 2 CPU ranks, gloo

`main()` is the training story: setup (config -> accelerator -> tokenizer, data, model, optimizer,
schedule -> resume), then the loop (data window -> step -> log -> eval -> save -> stop?), then finish
(final eval, checkpoint, export). The distribution strategy comes from the launch config only; nothing
below branches on it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

# `python dtrain/train.py`: import the package, not dtrain/*.py as top-level modules
if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from dtrain import quiet

quiet.install()  # before torch and the Hugging Face libraries print their import-time messages

import torch

from dtrain.background_save import staging_line
from dtrain.checkpoint import (
    Checkpointer,
    TrainState,
    check_continuity,
    check_model_identity,
)
from dtrain.config import Config, flatten, parse_config
from dtrain.data import (
    Collator,
    Data,
    check_isolation,
    load_run_data,
    probe_rows,
    train_collator,
    train_loader,
)
from dtrain.evaluation import report_samples, run_eval, track_best
from dtrain.export import export_final
from dtrain.guards import NONFINITE_EXIT_CODE, NonfiniteGuard, RunHalted
from dtrain.loss import check_chunked_loss, count_targets, forward_logits, forward_loss_sum, use_chunked_loss
from dtrain.mesh import describe as describe_mesh
from dtrain.metrics import MetricsLogger, StepStats
from dtrain.modeling import (
    attn_implementation,
    build_model,
    build_tokenizer,
    count_parameters,
    flops_per_token,
    model_identity,
)
from dtrain.optim import build_optimizer, build_scheduler, optimizer_state_row
from dtrain.peft import add_adapters, base_reference, describe, load_options, summary
from dtrain.plots import at_eval as plots_at_eval
from dtrain.process import guarded
from dtrain.profiling import OFF, StepProfiler, step_profiler
from dtrain.rank_memory import HeldBytes
from dtrain.rundir import prepare_output_dir, record_end, resolve_resume, write_run_files
from dtrain.runtime import (
    build_accelerator,
    check_fsdp_wrapping,
    compiled_modules,
    count_sharded,
    describe_launch,
    fsdp_unit_classes,
    run_info,
)
from dtrain.signals import STOP_EXIT_CODE, StopRequest
from dtrain.summary import at_end as summary_at_end

if TYPE_CHECKING:
    from collections.abc import Iterator

    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from dtrain.data import PackedCollator


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(argv)
    run = setup(cfg, argv)  # accelerator, tokenizer, data, model, optimizer, schedule, resume
    if run.already_complete:
        return 0
    state = run.state
    if cfg.eval.at_start and state.step == 0:
        evaluate(run, step=0)  # the untrained baseline
    run.model.train()
    run.logger.restart_clock()
    requested = None
    while state.step < run.max_steps and not state.early_stopped and not requested:
        plan = StepPlan.at(state.step + 1, cfg, run.max_steps)
        run.profiler.begin(state.step + 1)  # --log.profile_steps (a no-op when off)
        window = run.next_window()  # data window
        grad_norm = take_step(run, window)  # step (one that is not finite on some rank is never applied)
        run.profiler.end(state.step)
        if run.rollback_from is not None:
            roll_back(run)  # --train.nonfinite rollback: back to the newest checkpoint, past this window
            continue
        if plan.log:
            log_train(run, grad_norm)  # log
        stop = plan.eval and evaluate(run, state.step)  # eval (early stopping decides here)
        requested = run.stop.agreed()  # a signal on any rank, agreed by every rank at this step
        if plan.save or stop or (requested and state.step < run.max_steps):
            run.checkpointer.save()  # save
        if plan.eval or plan.save:
            run.logger.restart_clock()  # eval and save time is not training throughput
        if stop:
            break  # stop
    if requested and state.step < run.max_steps:
        return stop_on_request(run, requested)
    finish(run)
    return 0


# --------------------------------------------------------------------------------------------
# Setup: everything before the first step
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """The objects the loop works with, built once by `setup`."""

    cfg: Config
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    data: Data
    model: torch.nn.Module  # as prepared: wrapped by DDP, FSDP or DeepSpeed under those profiles
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainState
    checkpointer: Checkpointer
    logger: MetricsLogger
    collator: Collator  # eval batches (never packed)
    batcher: Collator | PackedCollator  # train batches: PackedCollator with --data.packing
    max_steps: int
    num_params: int
    trained_params: int
    stop: StopRequest  # signals turned into a stop every rank agrees on
    guard: NonfiniteGuard  # the agreed verdict on non-finite steps
    stats: StepStats
    held: HeldBytes  # this rank's parameter, gradient and optimizer-state bytes, logged in the first row
    already_complete: bool = False
    rollback_from: int | None = None  # the data position of a window that faulted, under nonfinite=rollback
    batches: Iterator[dict] | None = None  # this rank's micro-batch stream (restarted after a rollback)
    lr: float | torch.Tensor | None = None  # the last step's (read before the schedule moves it)
    state_reported: bool = False  # optimizer-state bytes are logged once, at the first log row
    predictions: list[dict] = field(default_factory=list)
    profiler: StepProfiler = OFF  # --log.profile_steps: begin/end around each step; OFF does nothing

    @property
    def global_batch(self) -> int:
        t = self.cfg.train
        return t.per_device_batch_size * t.gradient_accumulation_steps * self.accelerator.num_processes

    def next_window(self) -> list[dict]:
        """The next accumulation window of this rank's micro-batches."""
        if self.batches is None:
            self.batches = self.train_batches()
        return [next(self.batches) for _ in range(self.cfg.train.gradient_accumulation_steps)]

    def train_batches(self) -> Iterator[dict]:
        """This rank's micro-batches from the current data position on."""
        t, acc = self.cfg.train, self.accelerator
        loader = train_loader(
            self.data.train,
            self.data.order,
            t.per_device_batch_size,
            acc.process_index,
            acc.num_processes,
            self.state.samples_seen,
            self.batcher,
            self.cfg.data.num_workers,
            pin=acc.device.type == "cuda",
        )
        return iter(loader)


def setup(cfg: Config, argv: list[str]) -> Run:
    """Build every component, then resume. The output directory is read first and changed only once every
    input (tokenizer, data, model) has loaded, so a bad input never costs an earlier run anything."""
    accelerator = build_accelerator(cfg)
    quiet.once_distributed(accelerator.is_main_process)
    out = Path(cfg.output_dir)
    plan = resolve_resume(out, cfg.checkpoint.resume, cfg.overwrite_output_dir, cfg.to_yaml())
    changes = check_continuity(plan.path, cfg, accelerator) if plan.path else []  # before anything heavy

    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    tokenizer = build_tokenizer(cfg.model)
    data = load_run_data(cfg, tokenizer, accelerator)
    if data.chat_template:  # saved with the tokenizer in every checkpoint and the final model
        tokenizer.chat_template = data.chat_template
    with data.discarded_on_error(accelerator):  # a start that fails leaves no new data cache behind
        # the embedded model's weights depend on the seed alone (export rebuilds a base)
        set_seed(cfg.train.seed)
        model = build_model(
            cfg.model,
            tokenizer,
            cfg.data,
            cfg.eval,
            data.stats["longest_example"],
            **load_options(cfg, accelerator),
        )
        base = base_reference(cfg, model)  # --peft.method lora|qlora: the frozen base the adapters belong to
        model = add_adapters(model, cfg)
        identity = {**model_identity(model), **({"base": base} if base else {})}
        if plan.path is not None:  # a checkpoint of another model is refused before anything is read from it
            check_model_identity(plan.path, identity, cfg)
        num_params = identity["parameters"]
        trained_params = count_parameters(model, trainable_only=True)  # all of them, or the adapters
        flops = flops_per_token(model, num_params, cfg.data.max_length)  # for MFU on CUDA
        max_steps = total_steps(cfg, len(data.train), accelerator.num_processes)
        optimizer = build_optimizer(model, cfg.optim, accelerator.device)
        # Stepped by hand once per optimizer step (fp16-skipped steps excluded), so not prepared; the
        # checkpointer saves it with everything else.
        scheduler = build_scheduler(optimizer, cfg.optim, max_steps)
        if cfg.train.loss_chunk_size:
            use_chunked_loss(model, cfg.train.loss_chunk_size)
        check_fsdp_wrapping(accelerator, model)
        attention = attn_implementation(model)  # read before prepare: unwrapping would import deepspeed
        model, optimizer = accelerator.prepare(model, optimizer)
        if accelerator.is_main_process:
            prepare_output_dir(out, cfg.overwrite_output_dir, plan)
    accelerator.wait_for_everyone()

    state = TrainState()
    checkpointer = Checkpointer(accelerator, cfg, model, optimizer, scheduler, state, tokenizer, identity)
    if plan.path is not None:
        checkpointer.load(plan.path)
    logger = MetricsLogger(accelerator, out, max_steps, state.step, cfg.log.progress_bar, flops)
    device_type = accelerator.device.type
    collator = Collator(tokenizer.pad_token_id, pad_to_multiple_of=8 if device_type == "cuda" else 1)  # eval
    batcher = train_collator(cfg.data, tokenizer.pad_token_id, device_type, attention)
    check_fast_paths(cfg, model, data, batcher, len(tokenizer), attention, accelerator.device)
    run = Run(
        cfg,
        accelerator,
        tokenizer,
        data,
        model,
        optimizer,
        scheduler,
        state,
        checkpointer,
        logger,
        collator,
        batcher,
        max_steps,
        num_params,
        trained_params,
        stop=StopRequest(accelerator, cfg.train.collective_timeout_s),
        guard=NonfiniteGuard(accelerator),
        stats=StepStats(accelerator.device),
        held=HeldBytes(accelerator, model, optimizer),
        profiler=step_profiler(cfg.log, accelerator, out, max_steps, logger.write),
    )
    if plan.path is not None:
        finished = state.step >= max_steps or state.early_stopped
        if finished and (out / "final" / "config.json").is_file():
            accelerator.print(
                f"dtrain: run in {out} is already complete at step {state.step}; final model in {out / 'final'}"
            )
            run.already_complete = True
            return run
        accelerator.print(f"dtrain: resuming from {plan.path} at step {state.step}")
    logger.truncate_after(state.step)
    record_run(run, argv, plan.path, changes)
    return run


def check_fast_paths(
    cfg: Config, model, data: Data, batcher, vocab: int, attention: str | None, device
) -> None:
    """Before the first step, on the live (wrapped) model: packed examples cannot see each other, and the
    chunked loss equals the plain one. Every rank runs the same probes (sharded forwards need them all)."""
    if cfg.data.packing:
        rows = probe_rows(data.train.examples(2), vocab)
        check_isolation(model, forward_logits, batcher, rows, f"attn_implementation {attention}")
    if cfg.train.loss_chunk_size:  # one short row: the plain side of the check must not need much memory
        ids = torch.as_tensor(data.train.examples(1)[0]["input_ids"][:16], device=device)[None]
        check_chunked_loss(model, {"input_ids": ids, "labels": ids})


def record_run(run: Run, argv: list[str], resumed_from: Path | None, changes: list[str]) -> None:
    """config.yaml and run_info.json, the trackers, and the start-up line."""
    acc, cfg, state = run.accelerator, run.cfg, run.state
    adapters = summary(acc.unwrap_model(run.model), cfg)  # None without --peft.method
    if acc.is_main_process:
        info = run_info(acc, cfg, argv, run.data.stats, run.num_params)
        info["distributed"]["sharded_parameters"] = count_sharded(run.model)
        info["distributed"]["fsdp_units"] = fsdp_unit_classes(run.model)
        info["distributed"]["mesh"] = describe_mesh(run.model, acc)  # hsdp: dims and placements
        info["compiled_modules"] = compiled_modules(run.model)
        info["peft"] = adapters
        if resumed_from is not None:
            info["resumed_from"] = {
                "checkpoint": str(resumed_from),
                "step": state.step,
                "config_changes": changes,
            }
        write_run_files(Path(cfg.output_dir), cfg, info)
    if cfg.log.report_to != "none":
        acc.init_trackers(cfg.log.project, config=flatten(cfg))
    t, world = cfg.train, acc.num_processes
    precision = {"no": "fp32"}.get(acc.mixed_precision, acc.mixed_precision)
    run.logger.write(
        f"dtrain: {run.num_params / 1e6:.2f}M params, {describe_launch(acc)}, {precision}, global batch "
        f"{run.global_batch} ({t.per_device_batch_size} per device x {t.gradient_accumulation_steps} "
        f"accumulation x {world} {'process' if world == 1 else 'processes'}), {run.max_steps:,} "
        f"{'step' if run.max_steps == 1 else 'steps'}; "
        f"{run.data.describe()}" + (f"; {describe(adapters)}" if adapters else "")
    )
    if run.checkpointer.background is not None:
        run.logger.write(staging_line(run.model, cfg.optim.name))
    if len(run.data.names) > 1:
        run.logger.write(run.data.mix(run.max_steps * run.global_batch))
    for warning in run.data.warnings:
        run.logger.write(warning)


def total_steps(cfg: Config, num_examples: int, world_size: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    assert cfg.train.num_epochs is not None  # validate: max_steps or num_epochs, exactly one
    global_batch = cfg.train.per_device_batch_size * cfg.train.gradient_accumulation_steps * world_size
    return max(1, math.ceil(cfg.train.num_epochs * num_examples / global_batch))


# --------------------------------------------------------------------------------------------
# The loop's steps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """What optimizer step `step` does besides training, from the config alone. The last step's eval and
    checkpoint are the final ones (`finish`), so the periodic ones skip it."""

    log: bool
    eval: bool
    save: bool

    @classmethod
    def at(cls, step: int, cfg: Config, max_steps: int) -> StepPlan:
        is_eval = bool(cfg.eval.steps) and step % cfg.eval.steps == 0
        is_save = bool(cfg.checkpoint.save_steps) and step % cfg.checkpoint.save_steps == 0
        last = step == max_steps
        log = step % cfg.log.every_steps == 0 or last or is_eval or is_save
        return cls(log=log, eval=is_eval and not last, save=is_save and not last)


def take_step(run: Run, window: list[dict]):
    """One optimizer step over the window and the bookkeeping around it; returns the gradient norm (a
    device tensor, or None when nothing was trained). A window without a single target token on any rank
    (every example's response truncated away) is skipped on every rank alike: nothing to learn, so no
    update, counted as `empty_steps`; every rank knows that from the data order alone, without a sync. So
    is a window a rollback steps over. A step whose loss or gradient norm is not finite on some rank is
    never applied (guards.py): `on_nonfinite` then skips it, halts, or asks for a rollback."""
    state, acc = run.state, run.accelerator
    run.lr = run.optimizer.param_groups[0]["lr"]  # a tensor for some optimizers (torchao): read when logging
    grad_norm = None
    held = run.data.window(state.samples_seen, run.global_batch)  # from the data order: no sync
    if state.samples_seen in state.skip_windows:
        pass  # faulted before a rollback: stepped over
    elif not held.has_targets:
        state.empty_steps += 1
    else:
        step = train_step(acc, run.model, run.optimizer, window, run.cfg.train.max_grad_norm, run.guard)
        grad_norm = step.grad_norm
        if step.nonfinite:
            on_nonfinite(run)
        else:
            state.nonfinite_in_a_row = 0
            run.stats.add(step.loss_sum, step.targets, step.tokens, step.positions)
            if acc.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the update
                state.skipped_steps += 1
            else:
                run.scheduler.step()
    state.step, state.samples_seen = state.step + 1, state.samples_seen + run.global_batch
    state.epoch = state.samples_seen / len(run.data.train)
    state.source_rows = (held.rows + (state.source_rows or 0)).tolist()  # realised shares, host arrays
    state.source_tokens = (held.tokens + (state.source_tokens or 0)).tolist()
    run.logger.advance()
    return grad_norm


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # device tensors: summed over the window on this rank
    targets: torch.Tensor
    tokens: torch.Tensor
    positions: int
    grad_norm: object  # before clipping: a device tensor (a float under DeepSpeed)
    nonfinite: bool  # agreed by every rank: the update was not applied


def train_step(accelerator, model, optimizer, window: list[dict], max_grad_norm: float, guard) -> StepResult:
    """One optimizer step over an accumulation window of micro-batches.

    The loss is the token-sum over the window divided by the number of target tokens in the whole
    window over all ranks (one all-reduce, no host sync). Accelerate divides by the accumulation
    steps and DDP/FSDP/ZeRO average over ranks, so the scale multiplies both back. Before the update
    the guard agrees with every rank that loss and gradient norm are finite (guards.py: one all-reduce
    and the step's one host read); if not, the update is dropped on every rank.
    """
    window = [{k: _to(v, accelerator.device) for k, v in b.items()} for b in window]
    targets = torch.stack([count_targets(b["labels"]) for b in window]).sum()
    global_targets = accelerator.reduce(targets.clone(), reduction="sum")
    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / global_targets.clamp(min=1)
    loss_sum = torch.zeros((), device=accelerator.device)
    grad_norm, nonfinite = None, False
    for batch in window:
        with accelerator.accumulate(model):
            batch_loss = forward_loss_sum(model, batch)  # no attention mask, no cache (see loss.py)
            accelerator.backward(batch_loss * scale)
            loss_sum += batch_loss.detach()
            if accelerator.sync_gradients:  # the pre-clip norm (inf = measure only), which the guard checks
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
                nonfinite = guard.faulted(loss_sum, grad_norm, optimizer)
                if nonfinite:
                    guard.discard(optimizer)
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    tokens = sum(b["attention_mask"].sum() for b in window)
    positions = sum(b["attention_mask"].numel() for b in window)
    return StepResult(loss_sum, targets, tokens, positions, grad_norm, nonfinite)


def on_nonfinite(run: Run) -> None:
    """A step no rank applied. Record where in the data it was, then act on --train.nonfinite: skip (go
    on; stop after max_nonfinite_steps in a row), halt, or rollback (the loop reloads the newest
    checkpoint). Every rank runs this alike: the verdict was agreed."""
    state, t = run.state, run.cfg.train
    state.nonfinite_steps += 1
    state.nonfinite_in_a_row += 1
    where = describe_window(run)
    run.logger.log(
        {
            "step": state.step + 1,
            "nonfinite": True,
            **where,
            "nonfinite_steps": state.nonfinite_steps,
            "action": t.nonfinite,
        }
    )
    at = (
        f"non-finite loss or gradient norm at step {state.step + 1} (data position {where['samples_seen']}, "
        f"examples {where['examples']})"
    )
    if t.nonfinite == "halt":
        halt(run, f"{at}; halted (--train.nonfinite halt)")
    if t.nonfinite == "rollback":
        if state.rollbacks >= t.max_nonfinite_steps:
            halt(run, f"{at}; halted after {state.rollbacks} rollbacks (--train.max_nonfinite_steps)")
        run.rollback_from = state.samples_seen
        return
    if state.nonfinite_in_a_row >= t.max_nonfinite_steps:
        halt(
            run,
            f"{at}; halted after {state.nonfinite_in_a_row} non-finite steps in a row "
            "(--train.max_nonfinite_steps)",
        )
    run.logger.write(f"dtrain: {at}: update skipped on every rank ({state.nonfinite_steps} so far)")


def describe_window(run: Run) -> dict:
    """The faulty window's data position and the train-data indices it holds (the first 16)."""
    start = run.state.samples_seen
    indices = run.data.order.indices(start, min(run.global_batch, 16)).tolist()
    return {"samples_seen": start, "examples": indices}


def halt(run: Run, message: str) -> None:
    """Stop every rank here with NONFINITE_EXIT_CODE, saving nothing: the newest checkpoint is the resume
    point. (All ranks call this alike, so the stop round in flight is finished by all.)"""
    run.stop.close()
    last = run.checkpointer.committed()  # a background save in flight lands first
    resume = (
        f"the newest checkpoint {last[-1].name} is the resume point" if last else "no checkpoint was saved"
    )
    end_early(
        run,
        "nonfinite",
        f"dtrain: {message}; {resume} (exit code {NONFINITE_EXIT_CODE})",
        checkpoint=str(last[-1]) if last else None,
    )
    raise RunHalted(NONFINITE_EXIT_CODE)


def end_early(run: Run, reason: str, line: str, **details) -> None:
    """A run that stops before its end: why, in run_info.json and one log line; then the ranks leave
    together, as at the end of finish()."""
    acc = run.accelerator
    run.profiler.close()  # stopped or halted inside --log.profile_steps: write what was recorded
    if acc.is_main_process:
        record_end(Path(run.cfg.output_dir), reason, run.state.step, **details)
    run.logger.write(line)
    if acc.is_main_process:  # plots (--log.plots) and summary.md; never fails the run
        summary_at_end(run.cfg.output_dir, run.cfg.log.plots, run.logger.write)
    run.logger.close()
    acc.wait_for_everyone()
    acc.end_training()


def roll_back(run: Run) -> None:
    """Reload the newest complete checkpoint and step over the window that faulted (recorded in the
    train state, so a later resume steps over it too). The fault counters survive the reload."""
    state = run.state
    bad, counts = run.rollback_from, (state.nonfinite_steps, state.rollbacks + 1)
    assert bad is not None  # the loop rolls back only after a faulted window
    run.rollback_from = None
    last = run.checkpointer.committed()  # a background save in flight lands first
    if not last:  # nothing to go back to: the update was not applied, so this is a skip
        state.rollbacks += 1
        run.logger.write(
            f"dtrain: no checkpoint to roll back to yet; the faulty step {state.step} was skipped"
        )
        return
    skip = sorted({*state.skip_windows, bad})
    run.checkpointer.load(last[-1])
    state.skip_windows, (state.nonfinite_steps, state.rollbacks) = skip, counts
    run.stats.reset()
    run.logger.rewind(state.step)
    run.batches = None  # the data stream restarts at the checkpoint's position
    run.logger.write(
        f"dtrain: rolled back to {last[-1].name} (rollback {state.rollbacks}); the window at "
        f"data position {bad} will be stepped over"
    )


def log_train(run: Run, grad_norm) -> None:
    """The train row: device sums copied to the host here, once per log interval."""
    state, acc = run.state, run.accelerator
    sums = run.stats.pop(acc)
    state.tokens_seen += int(sums["tokens"])
    row = run.logger.train_row(
        state.step, sums, _to_float(run.lr), _to_float(grad_norm), state.epoch, state.tokens_seen
    )
    if acc.mixed_precision == "fp16":
        row["skipped_steps"] = state.skipped_steps
    if state.empty_steps:
        row["empty_steps"] = state.empty_steps
    if state.nonfinite_steps:
        row["nonfinite_steps"] = state.nonfinite_steps
    if len(run.data.names) > 1:  # the realised token share of each source so far (host counters)
        total = max(1, sum(state.source_tokens))
        row.update(
            {
                f"share/{n}": round(t / total, 4)
                for n, t in zip(run.data.names, state.source_tokens, strict=True)
            }
        )
    row.update(run.checkpointer.pop_save_times())  # the newest save since the last row: blocked, committed
    if not run.state_reported:  # the optimizer state exists after one step
        row.update(optimizer_state_row(acc, run.optimizer, run.trained_params))  # per parameter it updates
        row.update(run.held.row())  # what this rank holds, beside `dtrain plan`'s estimate
        run.state_reported = True
    run.logger.log(row)


def evaluate(run: Run, step: int, final: bool = False) -> bool:
    """Eval, log, update best and early stopping; True when training should stop early."""
    cfg, state = run.cfg, run.state
    row, run.predictions = run_eval(
        run.accelerator, run.model, run.tokenizer, run.data, cfg, run.collator, step
    )
    patience = 0 if final or step == 0 else cfg.eval.early_stopping_patience
    stop = track_best(state, row, cfg.eval.metric, patience) if step else False
    run.logger.log(row)
    if cfg.log.plots and not final and run.accelerator.is_main_process:  # the end redraws them anyway
        plots_at_eval(cfg.output_dir, run.logger.write)
    if stop:
        state.early_stopped = True
        run.logger.write(
            f"dtrain: early stopping at step {step}: no {cfg.eval.metric} improvement in {patience} evals "
            f"(best {state.best_metric:.4g} at step {state.best_step})"
        )
    return stop


def finish(run: Run) -> None:
    """Final eval (unless this step already had one), the last checkpoint, final/, samples."""
    state, acc, out = run.state, run.accelerator, Path(run.cfg.output_dir)
    if state.last_eval_step != state.step:
        evaluate(run, state.step, final=True)
    run.stop.close()
    run.profiler.close()  # a run that ended inside --log.profile_steps (early stopping)
    last = run.checkpointer.save(wait=True)  # a no-op when already committed (early stop, resumed end)
    export_final(acc, last, out / "final")
    if acc.is_main_process:
        record_end(
            out,
            "early_stopped" if state.early_stopped else "finished",
            state.step,
            checkpoint=str(last),
            **source_shares(run),
        )
    run.logger.close()
    report_samples(acc, out, run.predictions, run.cfg.eval.num_samples)
    if acc.is_main_process and run.predictions and run.cfg.eval.num_samples:
        print(f"dtrain: final model in {out / 'final'}", flush=True)
    if acc.is_main_process:  # plots (--log.plots) and summary.md; never fails the run
        summary_at_end(out, run.cfg.log.plots, run.logger.write)
    acc.end_training()


def source_shares(run: Run) -> dict:
    """The realised share of each data source at the end, beside its target (nothing for one source)."""
    shares = run.data.realised(run.state.source_rows, run.state.source_tokens)
    return {"data_sources": shares} if shares else {}


def stop_on_request(run: Run, signal_name: str) -> int:
    """After the agreed stop's checkpoint: say why in run_info.json and the log, exit with STOP_EXIT_CODE."""
    run.stop.close()
    last = run.checkpointer.save(wait=True)  # saved in the loop: returns its path once committed
    end_early(
        run,
        "stop_request",
        f"dtrain: stopped by {signal_name} at step {run.state.step}; checkpoint "
        f"{last.name} saved; rerun the same command to resume (exit code {STOP_EXIT_CODE})",
        signal=signal_name,
        checkpoint=str(last),
    )
    return STOP_EXIT_CODE


def _to(value, device):
    # not every collated value is a tensor: flash attention's max_length_q is an int
    return value.to(device, non_blocking=True) if torch.is_tensor(value) else value


def _to_float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


def run(argv: list[str] | None = None) -> int:
    """Entry point, under `dtrain.process.guarded`: a user error is one line and exit code 2."""
    return guarded(main, argv)


if __name__ == "__main__":
    from dtrain.process import exit_with

    exit_with(run())

"""dtrain's training script: one Accelerate loop, unchanged under every launch profile.

    python dtrain/train.py                                      # embedded default run (CPU or one GPU)
    python dtrain/train.py --config my_recipe.yaml --optim.lr 1e-5
    accelerate launch --num_processes 4 dtrain/train.py --config my_recipe.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 dtrain/train.py   # 2 CPU ranks, gloo

`main()` reads top to bottom: config -> accelerator -> tokenizer, data, model, optimizer,
schedule -> resume -> loop -> final eval -> checkpoint and export. The distribution strategy
comes from the launch config only; nothing below branches on it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

if __package__ in (
    None,
    "",
):  # `python dtrain/train.py`: import the package, not dtrain/*.py as top-level modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from dtrain.checkpoint import (
    Checkpointer,
    TrainState,
    check_continuity,
    export_final,
    prepare_output_dir,
    resolve_resume,
    write_json_atomic,
)
from dtrain.config import Config, UserError, flatten, parse_config
from dtrain.data import Collator, Data, build_data, train_loader
from dtrain.evaluation import eval_loss, generate_answers
from dtrain.metrics import MetricsLogger, StepStats
from dtrain.modeling import build_model, build_tokenizer, count_parameters, count_targets, token_loss_sum
from dtrain.optim import build_optimizer, build_scheduler, optimizer_state_bytes
from dtrain.runtime import build_accelerator, run_info


def load_data(cfg: Config, tokenizer, accelerator) -> Data:
    """The user's data, or the embedded synthetic tasks written to <output_dir>/data/ first."""
    train_path, eval_path = cfg.data.path, cfg.data.eval_path
    with accelerator.main_process_first():  # main writes/tokenizes first; the others reuse its cache
        if train_path is None:
            from dtrain.tasks import write_synthetic_data

            d = cfg.data
            data_dir = Path(cfg.output_dir) / "data"
            if accelerator.is_main_process:
                write_synthetic_data(
                    data_dir,
                    d.synthetic_tasks,
                    d.synthetic_train_examples,
                    d.synthetic_eval_examples,
                    cfg.train.seed,
                )
            train_path, eval_path = str(data_dir / "train.jsonl"), str(data_dir / "eval.jsonl")
        return build_data(cfg.data, tokenizer, train_path, eval_path, cfg.train.seed, cfg.eval.num_generate)


def total_steps(cfg: Config, num_examples: int, world_size: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    global_batch = cfg.train.per_device_batch_size * cfg.train.gradient_accumulation_steps * world_size
    return max(1, math.ceil(cfg.train.num_epochs * num_examples / global_batch))


def train_step(accelerator, model, optimizer, window: list[dict], max_grad_norm: float, want_norm: bool):
    """One optimizer step over an accumulation window of micro-batches.

    The loss is the token-sum over the window divided by the number of target tokens in the whole
    window over all ranks (one all-reduce, no host sync). Accelerate divides by the accumulation
    steps and DDP/FSDP/ZeRO average over ranks, so the scale multiplies both back.
    """
    window = [{k: v.to(accelerator.device, non_blocking=True) for k, v in b.items()} for b in window]
    targets = torch.stack([count_targets(b["labels"]) for b in window]).sum()
    global_targets = accelerator.reduce(targets.clone(), reduction="sum")
    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / global_targets.clamp(min=1)
    loss_sum = torch.zeros((), device=accelerator.device)
    grad_norm = None
    for batch in window:
        with accelerator.accumulate(model):
            # Batches are right-padded, so under the causal mask no real token ever sees a pad: the
            # attention mask is redundant. Passing none keeps attention on the fast causal path and
            # avoids transformers' is-there-padding check, a host sync per forward.
            logits = model(input_ids=batch["input_ids"]).logits
            batch_loss = token_loss_sum(logits, batch["labels"])
            accelerator.backward(batch_loss * scale)
            loss_sum += batch_loss.detach()
            if accelerator.sync_gradients:
                if max_grad_norm > 0 or want_norm:  # the pre-clip norm; inf = measure only
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    tokens = sum(b["attention_mask"].sum() for b in window)
    positions = sum(b["attention_mask"].numel() for b in window)
    return loss_sum, targets, tokens, positions, grad_norm


def run_eval(
    accelerator, model, tokenizer, data: Data, cfg: Config, collator: Collator, step: int
) -> tuple[dict, list[dict]]:
    model.eval()
    row: dict = {"step": step}
    batch_size = cfg.eval.batch_size or cfg.train.per_device_batch_size
    if data.eval is not None:
        row["eval_loss"] = eval_loss(accelerator, model, data.eval, batch_size, collator)
        row["eval_ppl"] = math.exp(min(row["eval_loss"], 50.0))
    predictions: list[dict] = []
    if data.generate and cfg.eval.num_generate:
        scores, predictions = generate_answers(
            accelerator, model, tokenizer, data.generate, batch_size, cfg.eval.max_new_tokens
        )
        row.update({f"eval_{k}": v for k, v in scores.items()})
    model.train()
    return row, predictions


def track_best(state: TrainState, row: dict, metric: str, patience: int) -> bool:
    """Update best/early-stopping state from an eval row; True when training should stop."""
    value = row.get(f"eval_{metric}")
    if value is not None and math.isnan(value):
        value = None
    state.last_eval_step, state.last_eval_metric = row["step"], value
    if value is None:
        return False
    better = state.best_metric is None or (
        value < state.best_metric if metric == "loss" else value > state.best_metric
    )
    if better:
        state.best_metric, state.best_step, state.evals_without_improvement = value, row["step"], 0
    else:
        state.evals_without_improvement += 1
    row["best_" + metric] = state.best_metric
    return bool(patience) and state.evals_without_improvement >= patience


def write_run_files(out: Path, cfg: Config, info: dict) -> None:
    """config.yaml (feed it back as --config to reproduce) and run_info.json (resumes appended)."""
    tmp = out / "config.yaml.tmp"
    tmp.write_text(cfg.to_yaml())
    tmp.replace(out / "config.yaml")
    path = out / "run_info.json"
    try:
        first = json.loads(path.read_text())
        first.setdefault("resumes", []).append(info)
        info = first
    except (OSError, ValueError):  # a fresh run (or a file torn by a kill: start it again)
        pass
    write_json_atomic(path, info)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(argv)
    accelerator = build_accelerator(cfg)
    quiet_other_ranks(accelerator)
    out = Path(cfg.output_dir)
    plan = resolve_resume(out, cfg.checkpoint.resume, cfg.overwrite_output_dir, cfg.to_yaml())
    resume_from, changes = plan.path, []
    if resume_from is not None:  # before anything heavy loads: refuse a resume that changes the run
        changes = check_continuity(resume_from, cfg, accelerator)
    if accelerator.is_main_process:
        prepare_output_dir(out, cfg.overwrite_output_dir, plan)
    accelerator.wait_for_everyone()

    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    tokenizer = build_tokenizer(cfg.model)
    data = load_data(cfg, tokenizer, accelerator)
    model = build_model(cfg.model, tokenizer, cfg.data, cfg.eval)
    num_params = count_parameters(model)
    max_steps = total_steps(cfg, len(data.train), accelerator.num_processes)
    optimizer = build_optimizer(model, cfg.optim, accelerator.device)
    scheduler = build_scheduler(optimizer, cfg.optim, max_steps)
    # The scheduler is stepped by hand once per optimizer step (fp16-skipped steps excluded), so it is
    # not prepared; the checkpointer saves it with everything else.
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    checkpointer = Checkpointer(accelerator, cfg, model, optimizer, scheduler, state, tokenizer)

    if resume_from is not None:
        checkpointer.load(resume_from)
        finished = state.step >= max_steps or state.early_stopped
        if finished and (out / "final" / "config.json").is_file():
            accelerator.print(
                f"dtrain: run in {out} is already complete at step {state.step}; final model in {out / 'final'}"
            )
            return 0
        accelerator.print(f"dtrain: resuming from {resume_from} at step {state.step}")
    logger = MetricsLogger(accelerator, out, max_steps, state.step, cfg.log.progress_bar)
    logger.truncate_after(state.step)
    if accelerator.is_main_process:
        info = run_info(accelerator, cfg, argv, data.stats, num_params)
        info["distributed"]["sharded_parameters"] = count_sharded(model)
        if resume_from is not None:
            info["resumed_from"] = {
                "checkpoint": str(resume_from),
                "step": state.step,
                "config_changes": changes,
            }
        write_run_files(out, cfg, info)
    if cfg.log.report_to != "none":
        accelerator.init_trackers(cfg.log.project, config=flatten(cfg))
    t, world = cfg.train, accelerator.num_processes
    global_batch = t.per_device_batch_size * t.gradient_accumulation_steps * world
    logger.write(
        f"dtrain: {num_params / 1e6:.2f}M params | {accelerator.distributed_type} x{world} | precision "
        f"{accelerator.mixed_precision} | global batch {t.per_device_batch_size} x {t.gradient_accumulation_steps} "
        f"x {world} = {global_batch} | {max_steps} steps | {data.stats}"
    )

    collator = Collator(
        tokenizer.pad_token_id, pad_to_multiple_of=8 if accelerator.device.type == "cuda" else 1
    )
    batches = iter(
        train_loader(
            data.train,
            t.per_device_batch_size,
            accelerator.process_index,
            world,
            t.seed,
            state.samples_seen,
            collator,
            cfg.data.num_workers,
            pin=accelerator.device.type == "cuda",
        )
    )
    stats = StepStats(accelerator.device)
    grad_norm = None
    state_reported = False
    predictions: list[dict] = []
    if cfg.eval.at_start and state.step == 0:
        row, _ = run_eval(accelerator, model, tokenizer, data, cfg, collator, step=0)
        logger.log(row)
    model.train()
    logger.restart_clock()
    while state.step < max_steps and not state.early_stopped:
        step = state.step + 1
        is_eval = bool(cfg.eval.steps) and step % cfg.eval.steps == 0
        is_save = bool(cfg.checkpoint.save_steps) and step % cfg.checkpoint.save_steps == 0
        is_log = step % cfg.log.every_steps == 0 or step == max_steps or is_eval or is_save
        window = [next(batches) for _ in range(t.gradient_accumulation_steps)]
        lr = optimizer.param_groups[0]["lr"]  # a tensor for some optimizers (torchao): read at log steps only
        loss_sum, targets, tokens, positions, grad_norm = train_step(
            accelerator, model, optimizer, window, t.max_grad_norm, is_log
        )
        if accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the update
            state.skipped_steps += 1
        else:
            scheduler.step()
        state.step, state.samples_seen = step, state.samples_seen + global_batch
        state.epoch = state.samples_seen / len(data.train)
        stats.add(loss_sum, targets, tokens, positions)
        logger.advance()

        if is_log:
            sums = stats.pop(accelerator)
            state.tokens_seen += int(sums["tokens"])
            row = logger.train_row(
                step,
                sums,
                _to_float(lr),
                _to_float(grad_norm),
                state.epoch,
                state.tokens_seen,
            )
            if accelerator.mixed_precision == "fp16":
                row["skipped_steps"] = state.skipped_steps
            if not state_reported:  # once, at the first log row: the state exists after one step
                row.update(optimizer_state_row(accelerator, optimizer, num_params))
                state_reported = True
            logger.log(row)
        stop_early = False
        if is_eval and step < max_steps:
            row, predictions = run_eval(accelerator, model, tokenizer, data, cfg, collator, step)
            stop_early = track_best(state, row, cfg.eval.metric, cfg.eval.early_stopping_patience)
            logger.log(row)
            if stop_early:
                state.early_stopped = True
                logger.write(
                    f"dtrain: early stopping at step {step}: no {cfg.eval.metric} improvement in "
                    f"{cfg.eval.early_stopping_patience} evals (best {state.best_metric:.4g} at step {state.best_step})"
                )
        if (is_save and step < max_steps) or stop_early:
            checkpointer.save()
        if is_eval or is_save:
            logger.restart_clock()
        if stop_early:
            break

    if state.last_eval_step != state.step:  # not when the last step (or a resumed end) already evaluated
        row, predictions = run_eval(accelerator, model, tokenizer, data, cfg, collator, state.step)
        track_best(state, row, cfg.eval.metric, 0)
        logger.log(row)
    last = checkpointer.save()  # a no-op when this step is already committed (early stop, resumed at the end)
    export_final(accelerator, last, out / "final")
    logger.close()
    report_samples(accelerator, out, predictions, cfg.eval.num_samples)
    accelerator.end_training()
    return 0


def count_sharded(model) -> str:
    """How many parameter tensors are DTensors (FSDP2 shards): proof that sharding really happened."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return f"{sum(isinstance(p, DTensor) for p in params)}/{len(params)}"


def optimizer_state_row(accelerator, optimizer, num_params: int) -> dict:
    """Optimizer-state bytes per parameter over all ranks, logged once: 8 for fp32 Adam, ~2 for 8-bit."""
    by_dtype = optimizer_state_bytes(optimizer)
    dtypes = sorted(by_dtype)
    totals = accelerator.gather_for_metrics([by_dtype], use_gather_object=True)
    merged: dict[str, int] = {}
    for part in totals:
        for key, value in part.items():
            merged[key] = merged.get(key, 0) + value
    replicas = 1 if accelerator.distributed_type.name in ("DEEPSPEED", "FSDP") else accelerator.num_processes
    return {
        "optim_state_bytes_per_param": sum(merged.values()) / replicas / num_params if num_params else None,
        "optim_state_dtypes": ",".join(sorted(set(dtypes) | set(merged))),
    }


def report_samples(accelerator, out: Path, predictions: list[dict], n: int) -> None:
    if not accelerator.is_main_process or not predictions or not n:
        return
    with open(out / "samples.jsonl", "w") as fh:
        for p in predictions[:n]:
            fh.write(json.dumps(p) + "\n")
            mark = "ok " if p["correct"] else "bad"
            print(
                f"[{mark}] {p['prompt']!r} -> {p['prediction']!r} (expected {p['reference']!r})", flush=True
            )
    print(f"dtrain: final model in {out / 'final'}", flush=True)


def _to_float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


def quiet_other_ranks(accelerator) -> None:
    """One copy of library warnings and progress bars, from the main process."""
    if not accelerator.is_local_main_process:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()


def run(argv: list[str] | None = None) -> int:
    """Entry point: user errors end as one line and exit code 2, never a traceback."""
    try:
        return main(argv)
    except UserError as exc:
        print(f"dtrain: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(run())

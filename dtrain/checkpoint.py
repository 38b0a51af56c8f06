"""Run directory, resumable checkpoints and the Hugging Face export.

A checkpoint is written by every rank (sharded strategies need all of them) into a temporary
directory, renamed to `step-<8 digits>` by the main process after a barrier, and only then
marked complete by a marker file written last. Only marked checkpoints are ever resumed from;
older ones are deleted only after a newer one is committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from dtrain.config import UserError

MARKER = "dtrain_checkpoint.json"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
RUN_FILES = ("config.yaml", "run_info.json", "metrics.jsonl", "samples.jsonl", "checkpoints", "final", "logs")


@dataclass
class TrainState:
    """The loop's own resumable state, saved with every checkpoint beside model and optimizer."""

    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # global data position: examples consumed over all ranks
    tokens_seen: int = 0  # non-pad input tokens over all ranks (updated at log steps)
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    skipped_steps: int = 0  # fp16 steps skipped by the grad scaler
    early_stopped: bool = False

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def _fsync_tree(path: Path) -> list[dict]:
    """fsync every file (data before marker) and return the manifest of relative paths and sizes."""
    files = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        files.append({"path": str(f.relative_to(path)), "bytes": f.stat().st_size})
    return files


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def config_hash(config_yaml: str) -> str:
    return hashlib.sha256(config_yaml.encode()).hexdigest()[:16]


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / MARKER).is_file()]
    return sorted(done, key=lambda p: p.name)


def has_earlier_run(output_dir: Path) -> bool:
    return any((output_dir / name).exists() for name in RUN_FILES)


def resolve_resume(output_dir: Path, resume: str, overwrite: bool) -> Path | None:
    """Decide where the run starts. Pure (reads only); cleanup happens in `prepare_output_dir`."""
    if resume not in ("auto", "never"):
        path = Path(resume).expanduser()
        if not (path / MARKER).is_file():
            raise UserError(
                f"--checkpoint.resume: '{resume}' is not a complete dtrain checkpoint (no {MARKER})"
            )
        return path
    if overwrite:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir / "checkpoints")
        if found:
            return found[-1]
    if has_earlier_run(output_dir):
        how = "" if resume == "never" else " and no complete checkpoint to resume from"
        raise UserError(
            f"--output_dir {output_dir} holds an earlier run{how}; pass --overwrite_output_dir to start over, "
            "or choose another --output_dir"
        )
    return None


def prepare_output_dir(output_dir: Path, overwrite: bool, resuming: bool) -> None:
    """Main process only: start-over cleanup (only dtrain's own files) and removal of stale temp dirs."""
    if overwrite and not resuming:
        for name in RUN_FILES:
            target = output_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    ckpt_root = output_dir / "checkpoints"
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith(TMP_PREFIX) or (
                p.name.startswith(STEP_PREFIX) and not (p / MARKER).is_file()
            ):
                print(f"dtrain: removing incomplete checkpoint {p}", flush=True)
                shutil.rmtree(p, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)


class Checkpointer:
    def __init__(self, accelerator, output_dir: Path, keep_last: int, config_yaml: str):
        self.accelerator = accelerator
        self.root = output_dir / "checkpoints"
        self.keep_last = keep_last
        self.config_yaml = config_yaml

    def save(self, state: TrainState) -> Path:
        """Write, commit, then rotate. Every rank must call this."""
        acc = self.accelerator
        final = self.root / step_dir_name(state.step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "config.yaml").write_text(self.config_yaml)
            files = _fsync_tree(tmp)
            if final.exists():  # re-saving a step (e.g. resumed and stopped again at once)
                shutil.rmtree(final)
            os.replace(tmp, final)
            marker = {
                "step": state.step,
                "world_size": acc.num_processes,
                "distributed_type": str(acc.distributed_type),
                "config_sha256": config_hash(self.config_yaml),
                "train_state": state.state_dict(),
                "files": files,
            }
            _write_json_atomic(final / MARKER, marker)
            self._rotate()
        acc.wait_for_everyone()
        return final

    def _rotate(self) -> None:
        done = complete_checkpoints(self.root)
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path) -> None:
        self.accelerator.load_state(str(path))


def export_hf(accelerator, model, tokenizer, out_dir: Path) -> None:
    """Write a Hugging Face model directory (safetensors, config, tokenizer, generation config).

    Every rank calls this: sharded strategies gather the full state dict collectively. The main
    process writes into a temporary directory and renames it, so `final/` is never half written.
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            old = out_dir.with_name(out_dir.name + ".old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    accelerator.wait_for_everyone()

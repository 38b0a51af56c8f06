"""The run directory: where a run starts (fresh, resumed, refused) and the files beside its checkpoints.

Reading comes first and changes nothing (`resolve_resume`); the directory is changed only once every
input has loaded (`prepare_output_dir`), so a bad input never costs an earlier run anything.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dtrain.checkpoint import (
    CORRUPT_PREFIX,
    MARKER,
    STEP_PREFIX,
    TMP_PREFIX,
    CheckpointError,
    complete_checkpoints,
    verify,
    write_json_atomic,
)
from dtrain.config import Config, UserError

RUN_FILES = ("config.yaml", "run_info.json", "metrics.jsonl", "samples.jsonl", "checkpoints", "final", "logs")


def has_earlier_run(output_dir: Path) -> bool:
    """Any of dtrain's files in output_dir (an empty directory holds nothing to lose)."""
    for name in RUN_FILES:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            if any(path.iterdir()):
                return True
        elif path.exists():
            return True
    return False


@dataclass
class ResumePlan:
    path: Path | None  # the checkpoint to load; None = fresh start
    corrupt: list[tuple[Path, str]]  # newer checkpoints skipped (auto), with the reason


def resolve_resume(output_dir: Path, resume: str, overwrite: bool, config_yaml: str) -> ResumePlan:
    """Decide where the run starts. Reads only; `prepare_output_dir` does the cleanup.

    With `auto` and no complete checkpoint, the same run (identical config.yaml) restarted before its
    first checkpoint starts again from step 0; any other earlier run in output_dir is refused."""
    if resume not in ("auto", "never"):
        path = _checkpoint_at(Path(resume).expanduser(), resume)
        problem = verify(path)
        if problem:
            raise CheckpointError(f"--checkpoint.resume: checkpoint {path} is corrupt: {problem}")
        return ResumePlan(path, [])
    if overwrite:
        return ResumePlan(None, [])
    corrupt: list[tuple[Path, str]] = []
    if resume == "auto":
        for candidate in reversed(complete_checkpoints(output_dir / "checkpoints")):
            problem = verify(candidate)
            if problem is None:
                return ResumePlan(candidate, corrupt)
            corrupt.append((candidate, problem))
    same_run = resume == "auto" and _read_text(output_dir / "config.yaml") == config_yaml
    if has_earlier_run(output_dir) and not same_run:
        how = "" if resume == "never" else " and no complete checkpoint to resume from"
        raise UserError(
            f"--output_dir {output_dir} holds an earlier run{how}; pass --overwrite_output_dir to start over, "
            "or choose another --output_dir"
        )
    return ResumePlan(None, corrupt)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def prepare_output_dir(output_dir: Path, overwrite: bool, plan: ResumePlan) -> None:
    """Main process only: start-over cleanup (only dtrain's own files), removal of unfinished checkpoints,
    and corrupt ones set aside (renamed, never deleted: they may hold what a user wants to inspect)."""
    if overwrite and plan.path is None:
        for name in RUN_FILES:
            target = output_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    for path, problem in plan.corrupt:
        aside = path.with_name(CORRUPT_PREFIX + path.name)
        print(
            f"dtrain: checkpoint {path.name} is corrupt ({problem}); moved to {aside.name} and resuming from "
            f"{plan.path.name if plan.path else 'scratch'}",
            flush=True,
        )
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(path, aside)
    ckpt_root = output_dir / "checkpoints"
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith(TMP_PREFIX) or (
                p.name.startswith(STEP_PREFIX) and not (p / MARKER).is_file()
            ):
                print(f"dtrain: removing incomplete checkpoint {p}", flush=True)
                shutil.rmtree(p, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)


def _checkpoint_at(path: Path, given: str) -> Path:
    """`--checkpoint.resume PATH`: a checkpoint, or a run directory (its newest complete checkpoint)."""
    if (path / MARKER).is_file():
        return path
    if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
        done = complete_checkpoints(path / "checkpoints")
        if done:
            return done[-1]
        raise CheckpointError(
            f"--checkpoint.resume: '{given}' is a run directory with no complete checkpoint; to continue that "
            f"run, rerun it with --output_dir {given} --checkpoint.resume auto (it starts again from step 0)"
        )
    raise CheckpointError(f"--checkpoint.resume: '{given}' is not a complete dtrain checkpoint (no {MARKER})")


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


def record_end(out: Path, reason: str, step: int, **details) -> None:
    """Why the run (or this resume of it) ended, in run_info.json: finished, early_stopped or stop_request
    (with the signal and the checkpoint to resume from)."""
    import datetime as _dt

    path = out / "run_info.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    latest = info["resumes"][-1] if info.get("resumes") else info
    latest["ended"] = {
        "reason": reason,
        "step": step,
        "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **details,
    }
    write_json_atomic(path, info)

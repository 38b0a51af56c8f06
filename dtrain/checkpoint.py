"""Run directory and resumable checkpoints that survive a crash at any instant.

Layout of one checkpoint, `<output_dir>/checkpoints/step-00001000/`:

    dcp/                     model + optimizer as torch.distributed.checkpoint shards, keyed by parameter
                             name, so they load at any world size (single process, DDP, FSDP)
    deepspeed/ds/            instead of dcp/ under DeepSpeed: the engine's own ZeRO checkpoint
    hf/                      model config, generation config and tokenizer (what `dtrain export` needs)
    scheduler.pt, scaler.pt  learning-rate schedule; fp16 grad scaler (when there is one)
    rng/rank-00000.pt        per-rank python, numpy, torch and CUDA RNG states
    train_state.json         step, data position, tokens seen, best metric, early-stopping counter...
    config.yaml              the resolved config of the run that saved it
    dtrain_checkpoint.json   the marker, written last: step, world size, profile, config hash, files+sizes

Commit protocol: every rank writes into `.tmp-step-...` (sharded strategies need all of them), all ranks
agree that every write succeeded, the main process fsyncs, renames to `step-...` and writes the marker
last. Only a marker makes a checkpoint count, and its file list is checked before anything is loaded.
Old checkpoints are deleted only after a newer one is committed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import time
import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from dtrain.background_save import REFUSED_UNDER_DEEPSPEED, BackgroundSave
from dtrain.config import Config, UserError, flatten
from dtrain.data.prepare import FORMAT_VERSION as DATA_FORMAT
from dtrain.data.prepare import stream_change
from dtrain.mesh import mesh_of

MARKER = "dtrain_checkpoint.json"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
CORRUPT_PREFIX = "corrupt-"
BEST_LINK = "best"
DS_TAG = "ds"
DS_UNIVERSAL_TAG = (
    "ds_universal"  # DeepSpeed's universal checkpoint, converted from DS_TAG for a new world size
)


@dataclass
class Snapshot:
    """A checkpoint's content at its save step: what the files and the marker will hold."""

    dcp: dict | Future | None  # model and optimizer state (None under DeepSpeed); a background save's host
    # copies arrive through a Future (the stager's thread copies them while the next step computes)
    rng: dict
    scheduler: dict
    scaler: dict | None
    train_state: dict


class CheckpointError(UserError):
    """A checkpoint that cannot be written or read; one line, names the file and what to do."""


@dataclass
class TrainState:
    """The loop's own resumable state, saved with every checkpoint beside model and optimizer."""

    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # global data position: examples consumed over all ranks
    tokens_seen: int = 0  # non-pad input tokens over all ranks (updated at log steps)
    epoch: float = 0.0  # samples_seen / train examples
    best_metric: float | None = None
    best_step: int | None = None
    last_eval_step: int | None = None  # the latest eval, recorded in the marker for `best` retention
    last_eval_metric: float | None = None
    evals_without_improvement: int = 0
    skipped_steps: int = 0  # fp16 steps skipped by the grad scaler
    empty_steps: int = 0  # steps whose window had no target token on any rank (skipped, see train.take_step)
    nonfinite_steps: int = 0  # steps whose loss or gradient norm was NaN/Inf on some rank (dtrain.guards)
    nonfinite_in_a_row: int = 0  # the current streak of them (skip stops the run at max_nonfinite_steps)
    rollbacks: int = 0  # reloads of the newest checkpoint after a fault, since a checkpoint was last saved
    skip_windows: list[int] = field(default_factory=list)  # data positions of windows a rollback skips
    source_rows: list[int] = field(default_factory=list)  # per data source: train rows consumed
    source_tokens: list[int] = field(default_factory=list)  # per data source: their tokens (no padding)
    early_stopped: bool = False

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def config_hash(config_yaml: str) -> str:
    return hashlib.sha256(config_yaml.encode()).hexdigest()[:16]


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Committed checkpoints (those with a marker), oldest first."""
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / MARKER).is_file()]
    return sorted(done, key=lambda p: p.name)


def verify(path: Path) -> str | None:
    """None when every file the marker lists is there with its recorded size, else what is wrong."""
    try:
        marker = read_marker(path)
        files = marker["files"]
    except (OSError, ValueError, KeyError) as exc:
        return f"its marker {MARKER} is unreadable ({exc})"
    for entry in files:
        f = path / entry["path"]
        if not f.is_file():
            return f"file '{entry['path']}' is missing"
        size = f.stat().st_size
        if size != entry["bytes"]:
            return f"file '{entry['path']}' is {size} bytes, the marker says {entry['bytes']}"
    return None


# --------------------------------------------------------------------------------------------
# Continuity: may this config continue that checkpoint?
# --------------------------------------------------------------------------------------------

# Settings that do not change the training trajectory. Everything else does (model, data, seed,
# optimizer, schedule, precision, clipping) and stops a resume unless --checkpoint.allow_config_change.
HARMLESS = (
    "log.",
    "eval.",
    "checkpoint.",
    "output_dir",
    "overwrite_output_dir",
    "data.num_workers",
    "data.prepared",
    "data.num_proc",
    "data.prepare_timeout_s",
    "model.gradient_checkpointing",
    "model.attn_implementation",
    "train.compile",
    "train.loss_chunk_size",
    "train.nonfinite",
    "train.max_nonfinite_steps",
    "train.collective_timeout_s",
)
# The batch is compared as one number: 2 processes x 4 and 1 process x 8 are the same training.
BATCH_KEYS = ("train.per_device_batch_size", "train.gradient_accumulation_steps")


def compare_configs(
    saved: dict, marker: dict, cfg: Config, world_size: int, precision: str
) -> tuple[list, list]:
    """(breaking, harmless) differences between a checkpoint's run and this one, as 'key a -> b' strings."""
    old, new, defaults = flatten(saved), flatten(cfg), flatten(Config())
    breaking: list[str] = []
    harmless: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b or (key not in old and b == defaults.get(key)):
            continue  # a setting newer than the checkpoint, left at its default: what that run did
        change = f"{key} {a} -> {b}"
        if key in BATCH_KEYS:
            harmless.append(change)
        elif key == "train.max_steps":
            (harmless if a is not None and b is not None and b > a else breaking).append(change)
        elif key.startswith(HARMLESS):
            harmless.append(change)
        else:
            breaking.append(change)
    t = cfg.train
    old_batch = marker.get("global_batch")
    new_batch = t.per_device_batch_size * t.gradient_accumulation_steps * world_size
    if old_batch is not None and old_batch != new_batch:
        breaking.append(
            f"global batch {old_batch} -> {new_batch} (per-device batch x accumulation x processes)"
        )
    if marker.get("world_size") != world_size:
        harmless.append(f"processes {marker.get('world_size')} -> {world_size}")
    if marker.get("mixed_precision") not in (None, precision):
        breaking.append(f"mixed precision {marker.get('mixed_precision')} -> {precision}")
    return breaking, harmless


def check_continuity(path: Path, cfg: Config, accelerator) -> list[str]:
    """Refuse a resume that would silently change the run (before anything heavy is loaded); returns the
    changes that were allowed, for run_info.json."""
    marker = read_marker(path)
    fmt, is_ds = marker.get("format"), accelerator.distributed_type.name == "DEEPSPEED"
    if fmt == "deepspeed" and not is_ds:
        raise CheckpointError(
            f"checkpoint {path} was written by DeepSpeed ({marker.get('profile')}) and can only resume under "
            f"DeepSpeed; `dtrain export {path} OUT` turns it into a model to start a new run from"
        )
    if fmt == "dcp" and is_ds:
        raise CheckpointError(
            f"checkpoint {path} was written by {marker.get('profile')} and can't resume under DeepSpeed; resume it "
            f"with a non-DeepSpeed profile, or `dtrain export {path} OUT` and start a new run from OUT"
        )
    stage = accelerator.state.deepspeed_plugin.zero_stage if is_ds else None
    if is_ds and marker.get("zero_stage", stage) != stage:
        raise CheckpointError(
            f"checkpoint {path} was written by ZeRO-{marker['zero_stage']}, this run is ZeRO-{stage}; resume it "
            f"with the {marker.get('profile')} profile, or `dtrain export {path} OUT` and start a new run from OUT"
        )
    if is_ds and marker.get("world_size") != accelerator.num_processes:
        universal = path / "deepspeed" / DS_UNIVERSAL_TAG
        if (
            stage == 3
        ):  # measured: after the universal conversion ZeRO-3 resumes with different optimizer math
            raise CheckpointError(
                f"checkpoint {path} holds ZeRO-3 partitions for {marker.get('world_size')} processes, this run "
                f"has {accelerator.num_processes}; resume with {marker.get('world_size')} processes, or "
                f"`dtrain export {path} OUT` and start a new run from OUT (without the optimizer state)"
            )
        if not universal.is_dir():
            raise CheckpointError(
                f"checkpoint {path} holds ZeRO partitions for {marker.get('world_size')} processes, this run has "
                f"{accelerator.num_processes}; convert it once with `python -m deepspeed.checkpoint.ds_to_universal "
                f"--inject_missing_state --input_folder {path / 'deepspeed' / DS_TAG} --output_folder {universal}` "
                f"and rerun, or resume with {marker.get('world_size')} processes"
            )
        # DeepSpeed reads this flag when the engine is built, so it is set before accelerator.prepare
        accelerator.state.deepspeed_plugin.deepspeed_config["checkpoint"] = {"load_universal": True}
    changed = stream_change(marker.get("data_format", 1), cfg)
    if changed:
        raise CheckpointError(
            f"checkpoint {path.name} can't resume here: {changed}; finish that run with the dtrain that "
            f"started it, or `dtrain export {path} OUT` and start a new run from OUT"
        )
    saved = yaml.safe_load((path / "config.yaml").read_text())
    breaking, harmless = compare_configs(
        saved, marker, cfg, accelerator.num_processes, accelerator.mixed_precision
    )
    if breaking and not cfg.checkpoint.allow_config_change:
        raise CheckpointError(
            f"checkpoint {path.name} was saved by a different run: {'; '.join(breaking)}. Pass "
            "--checkpoint.allow_config_change to resume anyway, or use another --output_dir"
        )
    if breaking or harmless:
        accelerator.print("dtrain: resuming with changed settings: " + "; ".join(breaking + harmless))
    return breaking + harmless


def check_model_identity(path: Path, identity: dict, cfg: Config) -> None:
    """Refuse, before loading anything from it, a checkpoint written for another model than the one this
    run built (the directory behind --model.name_or_path now holds another model, or another size)."""
    saved = read_marker(path).get("model")
    if not saved or saved == identity:
        return  # a checkpoint from before the marker recorded the model: the config check stands alone
    base, now = saved.get("base"), identity.get("base")
    if base and now and base["fingerprint"] != now["fingerprint"]:
        raise CheckpointError(
            f"checkpoint {path} holds adapters trained on the base '{base['name_or_path'] or 'embedded'}' "
            f"(fingerprint {base['fingerprint'][:12]}), but --model.name_or_path "
            f"'{now['name_or_path'] or 'embedded'}' now holds another base ({now['fingerprint'][:12]}); point "
            "--model.name_or_path at the base that run trained on, or start fresh with another --output_dir"
        )

    def what(m):
        return f"{m['architecture']} with {m['vocab_size']} embedding rows and {m['parameters']:,} parameters"

    names = "" if saved["names_sha256"] != identity["names_sha256"] else " (same parameter names)"
    source = (
        f"--model.name_or_path '{cfg.model.name_or_path}'" if cfg.model.name_or_path else "the embedded model"
    )
    raise CheckpointError(
        f"checkpoint {path} holds a {what(saved)}, but {source} is a {what(identity)}{names}; point "
        "--model.name_or_path at the model that run trained, or start fresh with --checkpoint.resume never "
        "or another --output_dir"
    )


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def _fsync_tree(path: Path) -> list[dict]:
    """fsync every file (data before marker) and return the manifest of relative paths and sizes."""
    files = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        files.append({"path": str(f.relative_to(path)), "bytes": f.stat().st_size})
    return files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _rng_state() -> dict:
    """Tensors, ints and tuples only, so the file loads with `torch.load(weights_only=True)`: numpy's key
    array travels as an int64 tensor."""
    import numpy as np

    state = np.random.get_state(legacy=True)  # the default; numpy's stubs type a bare call as legacy=False
    assert isinstance(state, tuple)  # the global generator is MT19937: its legacy state is a tuple
    name, keys, pos, has_gauss, gauss = state
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextmanager
def quiet_single_process():
    """DCP warns that it is 'assuming the intent' on one process; the intent is exactly that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def profile_name(accelerator) -> str:
    """The launch profile (set by `dtrain launch`), or what the distributed type amounts to."""
    if os.environ.get("DTRAIN_PROFILE"):
        return os.environ["DTRAIN_PROFILE"]
    kind = accelerator.distributed_type.name
    if kind == "DEEPSPEED":
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind == "FSDP":
        return "hsdp" if mesh_of(accelerator) else "fsdp"
    return "single" if accelerator.num_processes == 1 else "ddp"


def best_checkpoint(done: list[Path], metric: str) -> Path | None:
    """The committed checkpoint with the best eval metric recorded in its marker (lowest loss, highest
    exact match; the earliest on a tie), or None when no checkpoint was saved at an eval step."""
    scored = []
    for p in done:
        ev = read_marker(p).get("eval")
        if ev and ev.get("metric") == metric and ev.get("value") is not None:
            scored.append((ev["value"] if metric == "loss" else -ev["value"], p))
    return min(scored, key=lambda vp: vp[0])[1] if scored else None


def retained(done: list[Path], keep_last: int, keep_every: int, best: Path | None) -> set[Path]:
    """Which committed checkpoints survive rotation: the newest keep_last, every keep_every-th step
    (milestones) and the best one. `done` is oldest first."""
    keep = set(done[-keep_last:])
    if keep_every:
        keep |= {p for p in done if read_marker(p)["step"] % keep_every == 0}
    if best is not None:
        keep.add(best)
    return keep


def rotate(root: Path, keep_last: int, keep_every: int, best_metric: str | None) -> None:
    """After a commit: point checkpoints/best at the best one (when tracked), delete what is not retained."""
    done = complete_checkpoints(root)
    best = best_checkpoint(done, best_metric) if best_metric else None
    if best is not None:  # checkpoints/best -> step-...: replaced atomically
        tmp_link = root / (BEST_LINK + ".tmp")
        try:
            if tmp_link.is_symlink() or tmp_link.exists():
                tmp_link.unlink()
            tmp_link.symlink_to(best.name)
            os.replace(tmp_link, root / BEST_LINK)
        except OSError:  # a filesystem without symlinks: the markers still say which one is best
            pass
    keep = retained(done, keep_last, keep_every, best)
    for old in done:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


STORAGE_FIX = "Free disk space or fix permissions under --output_dir, then rerun to resume"


def _why(error: BaseException | None, root: Path, previous: list[Path]) -> tuple[str, str]:
    """The cause of a failed save in a few words, and its fix. Writers often hide ENOSPC (torch.save
    reports a zip offset mismatch), so free space and write permission are checked directly."""
    if error is None:
        return "another rank failed", STORAGE_FIX
    if isinstance(error, CheckpointException) and error.failures:  # DCP: the first rank's own error
        error = next(iter(error.failures.values()))[0]  # (exception, traceback summary) pairs
    cause = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
    need = sum(f["bytes"] for f in read_marker(previous[-1])["files"]) if previous else 0
    free = shutil.disk_usage(root).free if root.exists() else 0
    if free < max(need, 1):
        return (
            f"disk full ({free / 2**20:.1f} MiB free under {root}, a checkpoint needs {need / 2**20:.1f} MiB) ({cause})",
            STORAGE_FIX,
        )
    if not os.access(root, os.W_OK):
        return f"permission denied: {root} is not writable ({cause})", STORAGE_FIX
    if isinstance(error, OSError):
        return cause, STORAGE_FIX
    # not the storage: some state this version cannot save
    return cause, "This is not a disk error: please report it with this line"


class Checkpointer:
    """Saves and loads everything a run needs to continue exactly. Every rank calls save and load."""

    def __init__(
        self,
        accelerator,
        cfg: Config,
        model,
        optimizer,
        scheduler,
        state: TrainState,
        tokenizer,
        identity: dict | None = None,
    ):
        self.acc = accelerator
        self.root = Path(cfg.output_dir) / "checkpoints"
        self.ckpt_cfg = cfg.checkpoint
        self.metric = cfg.eval.metric
        self.config_yaml = cfg.to_yaml()
        t = cfg.train
        self.global_batch = (
            t.per_device_batch_size * t.gradient_accumulation_steps * accelerator.num_processes
        )
        self.model, self.optimizer, self.scheduler, self.state = model, optimizer, scheduler, state
        self.tokenizer = tokenizer
        self.identity = identity  # modeling.model_identity of the model before wrapping
        self.deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
        self.adapters_only = cfg.peft.method != "none"
        self.save_times: list[dict] = []  # committed saves' timings, popped into the metrics rows
        self.background: BackgroundSave | None = None  # --checkpoint.async_save: the writer thread
        if cfg.checkpoint.async_save:
            if self.deepspeed:
                raise UserError(REFUSED_UNDER_DEEPSPEED)
            self.background = BackgroundSave(accelerator, cfg.train.collective_timeout_s)
            self.background.hold_updates(optimizer)

    # -- save ----------------------------------------------------------------------------------

    def save(self, wait: bool = False) -> Path:
        """Write, agree, commit, rotate. Returns the committed directory; with --checkpoint.async_save the
        one the save in flight commits to (`wait`: return only once it is committed). Any save in flight
        lands first: at most one is, and its failure is raised here, on every rank alike."""
        self.wait()
        step = self.state.step
        final = self.root / step_dir_name(step)
        if (final / MARKER).is_file() and verify(final) is None:
            return final  # this step is already committed (a run resumed at its last step)
        started = time.perf_counter()
        snap = self._snapshot()
        if self.background is None:
            self._save(snap, final, in_writer=False)
            self._timed(step, started, time.perf_counter())
            return final

        blocked_s = time.perf_counter() - started  # the training thread goes on once the writer starts
        background = self.background

        def write() -> None:
            self._save(snap, final, in_writer=True)
            # held: this save call, and the next update's wait for the copy (over before the files were)
            self._timed(step, started, started + blocked_s + background.held_s)

        self.background.start(write)
        if wait:
            self.wait()
        return final

    def _timed(self, step: int, started: float, blocked_until: float) -> None:
        """A committed save's times: how long the training thread was held, and until the commit."""
        now = time.perf_counter()
        self.save_times.append(
            {"save_step": step, "save_blocked_s": blocked_until - started, "save_committed_s": now - started}
        )

    def pop_save_times(self) -> dict:
        """The newest save committed since the last call (for the next metrics row), else nothing."""
        times, self.save_times = self.save_times, []
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in times[-1].items()} if times else {}

    def wait(self) -> None:
        """Until the background save in flight (if any) is committed; its failure is raised here."""
        if self.background is not None:
            self.background.wait()

    def committed(self) -> list[Path]:
        """The committed checkpoints, oldest first, the one in flight included once it has landed."""
        self.wait()
        return complete_checkpoints(self.root)

    def _snapshot(self) -> Snapshot:
        """Everything the checkpoint's files and marker hold, as of now. For a background save the model and
        optimizer tensors are being staged to host memory: the next update waits for that copy."""
        dcp_state: dict | Future | None = None if self.deepspeed else self._dcp_state()
        if isinstance(dcp_state, dict) and self.background is not None:
            dcp_state = self.background.stage(dcp_state)
        scaler = self.acc.scaler
        return Snapshot(
            dcp=dcp_state,
            rng=_rng_state(),
            scheduler=copy.deepcopy(self.scheduler.state_dict()),
            scaler=copy.deepcopy(scaler.state_dict()) if scaler is not None else None,
            train_state=copy.deepcopy(self.state.state_dict()),
        )

    def _save(self, snap: Snapshot, final: Path, in_writer: bool) -> None:
        """The commit protocol: each rank writes its files into a temporary directory, all agree, rank 0
        renames it into place and writes the marker last, all agree. Run by the training thread, or by
        every rank's writer thread (agreeing on the writers' own group)."""
        acc = self.acc
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        error: BaseException | None = None
        if acc.is_main_process:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except OSError as exc:
                error = exc
        self._agree(error, final, tmp, in_writer)
        try:
            self._write(tmp, snap)
        except (Exception, CheckpointException) as exc:  # disk full, permission denied, a failed shard
            error = exc
        if self.background is not None and in_writer:
            self.background.written()
        self._agree(error, final, tmp, in_writer)
        if acc.is_main_process:
            try:
                self._commit(tmp, final, snap)
            except Exception as exc:
                error = exc
        self._agree(error, final, tmp, in_writer)

    def _agree(self, error: BaseException | None, final: Path, tmp: Path, in_writer: bool) -> None:
        """All ranks learn whether any rank failed, so they all stop together instead of hanging."""
        if in_writer:  # the writers' own gloo group, CPU tensors
            assert self.background is not None
            failed = self.background.agree(error is not None)
        else:
            flag = torch.tensor([0.0 if error is None else 1.0], device=self.acc.device)
            if self.acc.num_processes > 1:
                flag = self.acc.reduce(flag, reduction="sum")
            failed = flag.item() != 0
        if not failed:
            return
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            if final.exists() and not (final / MARKER).is_file():
                shutil.rmtree(final, ignore_errors=True)
        previous = complete_checkpoints(self.root)
        kept = (
            f"the previous checkpoint {previous[-1].name} is intact"
            if previous
            else "no earlier checkpoint exists"
        )
        cause, fix = _why(error, self.root, previous)
        raise CheckpointError(f"saving checkpoint {final} failed: {cause}; {kept}. {fix}")

    def _write(self, tmp: Path, snap: Snapshot) -> None:
        acc = self.acc
        if self.deepspeed:
            self.model.save_checkpoint(
                str(tmp / "deepspeed"),
                tag=DS_TAG,
                save_latest=False,
                exclude_frozen_parameters=self.adapters_only,
            )
        else:
            import torch.distributed.checkpoint as dcp

            group = self.background.group if self.background is not None else None
            state = snap.dcp.result() if isinstance(snap.dcp, Future) else snap.dcp  # a failed copy raises
            with quiet_single_process():
                dcp.save(
                    state, checkpoint_id=str(tmp / "dcp"), process_group=group, no_dist=not _distributed()
                )
        rng_dir = tmp / "rng"
        rng_dir.mkdir(exist_ok=True)
        torch.save(snap.rng, rng_dir / f"rank-{acc.process_index:05d}.pt")
        if acc.is_main_process:
            torch.save(snap.scheduler, tmp / "scheduler.pt")
            if snap.scaler is not None:
                torch.save(snap.scaler, tmp / "scaler.pt")
            unwrapped = acc.unwrap_model(self.model)  # config, generation config, tokenizer: fixed in a run
            unwrapped.config.save_pretrained(tmp / "hf")
            if getattr(unwrapped.config, "auto_map", None):  # remote-code models: their modeling files too
                from transformers.dynamic_module_utils import custom_object_save

                custom_object_save(unwrapped, tmp / "hf", config=unwrapped.config)
            if unwrapped.generation_config is not None:
                unwrapped.generation_config.save_pretrained(tmp / "hf")
            self.tokenizer.save_pretrained(tmp / "hf")
            (tmp / "config.yaml").write_text(self.config_yaml)
            (tmp / "train_state.json").write_text(json.dumps(snap.train_state, indent=2))

    def _options(self):
        """Adapters (--peft.method): only what trains is saved and loaded; the frozen base comes from its
        own files, checked against the marker's fingerprint."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=self.adapters_only, strict=not self.adapters_only)

    def _dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer.optimizer, options=self._options())
        if self.adapters_only:  # what trains only: torch keeps a frozen tied head (the embedding under a
            # second name) and the base's buffers (QLoRA's quantisation state), which come from the base's files
            from dtrain.modeling import clean_name

            trains = {
                clean_name(n)
                for n, p in self.model.named_parameters(remove_duplicate=False)
                if p.requires_grad
            }
            model_sd = {k: v for k, v in model_sd.items() if k in trains}
        return {"model": model_sd, "optim": optim_sd}

    def _commit(self, tmp: Path, final: Path, snap: Snapshot) -> None:
        files = _fsync_tree(tmp)
        if final.exists():  # a leftover without a valid marker
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_json_atomic(final / MARKER, self._marker(files, snap.train_state))
        _fsync_dir(self.root)
        c = self.ckpt_cfg
        rotate(self.root, c.keep_last, c.keep_every, self.metric if c.keep_best else None)

    def _marker(self, files: list[dict], ts: dict) -> dict:
        """What the checkpoint holds, from the snapshot's train state `ts` (not the live one: a background
        save commits while later steps run)."""
        acc = self.acc
        return {
            "step": ts["step"],
            "format": "deepspeed" if self.deepspeed else "dcp",
            "world_size": acc.num_processes,
            "profile": profile_name(acc),
            "distributed_type": acc.distributed_type.name,
            "mesh": grid.dims() if (grid := mesh_of(acc)) else None,
            "zero_stage": acc.state.deepspeed_plugin.zero_stage if self.deepspeed else None,
            "mixed_precision": acc.mixed_precision,
            "global_batch": self.global_batch,
            "data_format": DATA_FORMAT,
            "config_sha256": config_hash(self.config_yaml),
            "model": self.identity,
            "eval": {"metric": self.metric, "value": ts["last_eval_metric"]}
            if ts["last_eval_step"] == ts["step"]
            else None,
            "train_state": ts,
            "files": files,
        }

    # -- load ----------------------------------------------------------------------------------

    def _load_rng(self, path: Path) -> dict:
        """The RNG file with weights_only=True. A file from before it held tensors only (numpy arrays,
        pickled) is read with pickle only from this run's own checkpoints directory, where dtrain wrote
        it; never from a checkpoint elsewhere (--checkpoint.resume PATH), which could run code."""
        import pickle

        try:
            return torch.load(path, weights_only=True)
        except pickle.UnpicklingError:
            if not path.resolve().is_relative_to(self.root.resolve()):
                raise CheckpointError(
                    f"{path} needs pickle to load (an RNG file from an older dtrain) and is outside this run's "
                    f"{self.root}; copy the checkpoint into {self.root} to trust it, or resume without it"
                ) from None
            return torch.load(path, weights_only=False)  # dtrain's own file in the run's own directory

    def load(self, path: Path) -> None:
        self.wait()  # a rollback while a save is in flight: it may be the newest checkpoint
        acc = self.acc
        if self.deepspeed:
            universal = self.model.load_universal_checkpoint()  # set by check_continuity for a new world size
            loaded, _ = self.model.load_checkpoint(
                str(path / "deepspeed"),
                tag=DS_UNIVERSAL_TAG if universal else DS_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
                load_module_strict=not self.adapters_only,
            )
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load {path / 'deepspeed'}")
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_state_dict

            state = self._dcp_state()
            with quiet_single_process():
                dcp.load(state, checkpoint_id=str(path / "dcp"), no_dist=not _distributed())
            set_state_dict(
                self.model,
                self.optimizer.optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optim"],
                options=self._options(),
            )
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        # The schedule owns the learning rate: restore it into the optimizer in case the optimizer state
        # did not carry it (DeepSpeed's universal checkpoint keeps only parameters and moments)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        if acc.scaler is not None and (path / "scaler.pt").is_file():
            acc.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
        rng = path / "rng" / f"rank-{acc.process_index:05d}.pt"
        if rng.is_file():  # absent when resuming on more processes than saved: only dropout is affected
            _set_rng_state(self._load_rng(rng))
        self.state.load_state_dict(json.loads((path / "train_state.json").read_text()))

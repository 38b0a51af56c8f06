"""The run's own cache of prepared data, prepared once for the whole job.

Without --data.prepared, the global main process alone prepares the sources (prepare.py) into
<output_dir>/data/prepared/<hash of what shaped them>/ and reuses that cache while its manifest matches.
The other ranks wait on a status file the main process writes when done, not in a collective (which
--train.collective_timeout_s would end), for at most --data.prepare_timeout_s; a failure on the main
process reaches them as its own one line. Output directories are shared by every node (checkpoints go
there), so one node tokenizes and every node maps the same arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from dtrain.config import Config, SourceConfig, UserError
from dtrain.data.prepare import (
    Prepared,
    check_manifest,
    data_key,
    manifest_matches,
    node_name,
    open_prepared,
    read_manifest,
    write_prepared,
)


def _agreed_token(accelerator) -> str:
    """One random token for this launch, the same on every rank (one broadcast, before any wait)."""
    token = [os.urandom(8).hex()]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(token, from_process=0)
    return token[0]


def _wait_for(signal: Path, timeout_s: int, rank: int) -> dict:
    """The other ranks: poll for the main process's word (a file, not a collective), bounded by our own
    timeout; the main process's failure arrives as its one line."""
    started = time.monotonic()
    while not signal.is_file():
        if time.monotonic() - started > timeout_s:
            raise UserError(
                f"rank {rank} waited {timeout_s} s for the main process to prepare the data and gave up; raise "
                "--data.prepare_timeout_s, or run `dtrain prepare` before the job and pass --data.prepared"
            )
        time.sleep(0.5)
    for _ in range(20):  # written by rename, so complete once there; read again on a slow filesystem
        try:
            word = json.loads(signal.read_text())
            break
        except (OSError, ValueError):
            time.sleep(0.25)
    else:
        raise UserError(f"rank {rank} could not read the main process's data status file {signal}")
    if "error" in word:
        raise UserError(word["error"])
    return word


def prepare_once(
    cfg: Config, tokenizer, accelerator, sources: list[SourceConfig], flags: list[str], before=None
) -> Prepared:
    """--data.prepared DIR (checked, then mapped), or the sources prepared into a cache under
    <output_dir>/data/prepared/ by the global main process alone, reused while its manifest matches.
    `before` runs on the main process first (writing the embedded data)."""
    d = cfg.data
    if d.prepared is not None:
        path = Path(d.prepared).expanduser()
        given = read_manifest(path)
        check_manifest(given, cfg, tokenizer, sources, path)
        return open_prepared(path, {**given, "cache": "prepared"}, cfg.eval.num_generate)
    root = Path(cfg.output_dir) / "data"
    host, rank = node_name(), accelerator.process_index
    token = _agreed_token(accelerator)
    signal = root / f".prepared-{token}.json"
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for old in root.glob(".prepared-*.json"):
                old.unlink(missing_ok=True)
            if before is not None:
                before()
            key = data_key(cfg, tokenizer, sources)
            cache = cache_dir(root, key)
            manifest = manifest_matches(cache, key)
            status = "hit" if manifest is not None else "miss"
            if manifest is None:
                others = (
                    f"; the other {accelerator.num_processes - 1} rank(s) wait for it (up to --data.prepare_timeout_s {d.prepare_timeout_s})"
                    if accelerator.num_processes > 1
                    else ""
                )
                print(
                    f"dtrain: preparing the data on {host} (rank 0, --data.num_proc {d.num_proc}){others}",
                    flush=True,
                )
                manifest = write_prepared(cfg, tokenizer, sources, cache, d.num_proc, flags)
            word = {"host": host, "cache": status, "dir": cache.name}
        except UserError as exc:
            word = {"error": str(exc)}
            raise
        except BaseException as exc:
            word = {
                "error": f"the main process failed to prepare the data ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:200]}); its own message says more"
            }
            raise
        finally:
            if accelerator.num_processes > 1:
                write_json(signal, word)
    else:
        if accelerator.is_local_main_process:
            print(f"dtrain: rank {rank} on {host} waits for rank 0 to prepare the data", flush=True)
        word = _wait_for(signal, d.prepare_timeout_s, rank)
        status, cache = word["cache"], cache_root(root) / word["dir"]
        if accelerator.is_local_main_process:
            print(
                f"dtrain: rank {rank} on {host} reads the data prepared by rank 0 on {word['host']}",
                flush=True,
            )
        manifest = read_manifest(cache)
    prepared = open_prepared(cache, {**manifest, "cache": status}, cfg.eval.num_generate)
    prepared.cache, prepared.created = cache, status == "miss"
    return prepared


def cache_root(data_dir: Path) -> Path:
    return data_dir / "prepared"


def cache_dir(data_dir: Path, key: dict) -> Path:
    """A run's cache of prepared data: <output_dir>/data/prepared/<hash of what shaped it>/, so a run with
    other data never touches an earlier run's cache (stale ones are dropped once a run has started)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root(data_dir) / digest


def drop_stale_caches(keep: Path) -> None:
    """Main process, once the run has started: remove the caches of data this run no longer uses."""
    for old in keep.parent.glob("*"):
        if old.is_dir() and old.name != keep.name:
            shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj) -> None:
    """Write by rename, so a reader sees the whole file or none."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)

"""Quiet output: a run's screen is dtrain's own.

The main process prints dtrain's lines, its progress bars and every library message about the run; the
few library messages below, which are emitted on import or on every start and say nothing about the
user's run, are dropped where they are logged (one logger, one message each, never a blanket filter).
Every other rank prints errors only (its warnings would repeat the main process's). `DTRAIN_VERBOSE=1`
turns all of this off. `install()` must run before torch and the Hugging Face libraries are imported, so
the filters are in place when the import-time messages are emitted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import warnings

# (logger, start of the message): each emitted whatever the run, by the versions noted.
NOISE = (
    # torch 2.13: torchao (imported by transformers' quantizers) registers its enums with torch's pytree
    ("torch.utils._pytree", "%s is an Enum subclass and is now natively supported"),
    # torchao 0.15+: its optional CUDA kernels, looked for on every import, absent on a CPU machine
    ("torchao", "Failed to load "),
    # bitsandbytes 0.49: an optional CPU kernel package (`kernels`) not installed
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    # DeepSpeed: no GPU found (the start-up line names the device the run uses)
    ("DeepSpeed", "Setting accelerator to CPU"),
)


# How long a rank other than rank 0 holds a user error back before printing it itself. An error every rank
# finds alike (a bad flag, a missing file) is printed by rank 0, whose exit makes the launcher stop the
# others meanwhile; an error only this rank finds is still printed, this much later. A node's first rank
# waits less than its neighbours, so a node rank 0 is not on prints it once, not once per process.
ERROR_GRACE_S = {"node_main": 5.0, "other": 10.0}


def verbose() -> bool:
    return os.environ.get("DTRAIN_VERBOSE", "") == "1"


def is_main_rank() -> bool:
    """From the launcher's environment, before any process group exists (torchrun and Slurm set RANK)."""
    return os.environ.get("RANK", "0") == "0"


def error_once(message: str) -> None:
    """Print a user error to stderr once per job, not once per rank (see ERROR_GRACE_S). The waiting rank
    never exits first: the launcher would then stop rank 0 before it prints and name this rank as the cause."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_main_rank():
        for sig in (signal.SIGTERM, signal.SIGINT):  # the launcher's stop ends the wait (no stop request)
            signal.signal(sig, signal.SIG_DFL)
        node_main = os.environ.get("LOCAL_RANK", "0") == "0"
        time.sleep(ERROR_GRACE_S["node_main" if node_main else "other"])
    print(message, file=sys.stderr, flush=True)


class _Drop(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def install() -> None:
    """The filters above on the main process; errors only on the other ranks. Idempotent."""
    if verbose() or getattr(install, "done", False):
        return
    install.done = True  # type: ignore[attr-defined]
    for name, start in NOISE:
        logging.getLogger(name).addFilter(_Drop(start))
    if not is_main_rank():
        _errors_only()


def _errors_only() -> None:
    """A rank other than the main one: its warnings and bars would repeat the main process's."""
    logging.disable(logging.WARNING)  # every logger, whatever level its library gave it
    warnings.simplefilter("ignore")
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # datasets is imported only where it tokenizes
    if "transformers" in sys.modules:  # already imported: the variables above come too late for them
        sys.modules["transformers"].logging.set_verbosity_error()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def once_distributed(is_main_process: bool) -> None:
    """With the process group up: transformers' weight loading and saving bars off (the run's own bar says
    where it is), and errors only from ranks a launcher started without RANK in their environment."""
    if verbose():
        return
    no_weight_bars()
    if not is_main_process:
        _errors_only()


def no_weight_bars() -> None:
    """transformers' "Loading weights" and "Writing model shards" bars off: dtrain says what it loaded and
    wrote (the run's start-up line, `dtrain export`'s last line)."""
    if verbose():
        return
    import transformers

    transformers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def no_dataset_bars():
    """`datasets`' "Generating train split" bars while it converts a local file: dtrain says what it read."""
    import datasets

    was_off = verbose() or not datasets.is_progress_bar_enabled()
    if not was_off:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            datasets.enable_progress_bars()

"""How a dtrain command's process ends: user errors as one line (`guarded`), then `exit_with`. Light: no
torch, so `dtrain plot` and the launch side start fast."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from dtrain import quiet
from dtrain.config import UserError
from dtrain.guards import RANK_LOST_EXIT_CODE, RunHalted, is_lost_rank


def exit_with(code: int) -> NoReturn:
    """`sys.exit(code)`, with every live object frozen out of the garbage collector first: the interpreter's
    final collections then skip the object graph torch, transformers and the run built, which they would
    only walk to free memory the process is about to give back (measured on the 2-core machine: 4.1 s of a
    2-step smoke run's exit, 0.6 s frozen). Files are still closed, atexit handlers and destructors still
    run. For a command's process only: a long-lived caller would keep its frozen garbage."""
    gc.freeze()
    sys.exit(code)


# the signals a run answers with a stop (dtrain.signals), and that launchers pass on to it
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run `cmd` in a session of its own and wait for it, passing on every stop signal this process gets
    (SIGINT, SIGTERM, Slurm's USR1/USR2); return its exit code. Its own session: a Ctrl-C in the terminal
    reaches it once, through this process, not twice (a second SIGINT would end the run at once)."""
    child = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, _frame):
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def guarded(entry, argv: list[str] | None = None) -> int:
    """Run a command's entry point: user errors end as one line and exit code 2, never a traceback. Anything
    else that escapes (an input dtrain does not check yet, or a bug) is one line too, exit code 1, with the
    traceback kept in a file (or shown with DTRAIN_TRACEBACK=1)."""
    try:
        return entry(argv)
    except UserError as exc:  # every rank finds it alike: said once, by rank 0
        quiet.error_once(f"dtrain: error: {exc}")
        return 2
    except RunHalted as halted:  # a non-finite step: every rank stopped together, the reason already logged
        return halted.code
    except Exception as exc:
        if os.environ.get("DTRAIN_TRACEBACK") == "1":
            raise
        if is_lost_rank(exc):
            reason = " ".join(str(exc).split())[:200]
            print(
                f"dtrain: error: lost contact with another rank in a collective ({reason}): it died or hung "
                f"past --train.collective_timeout_s; rerun the same command to resume from the newest "
                f"checkpoint (exit code {RANK_LOST_EXIT_CODE})",
                file=sys.stderr,
                flush=True,
            )
            # The rank that caused this (a user error, a crash) may still be exiting: give it a moment, so
            # the launcher records its failure first and names it. Then leave at once: a normal exit would
            # wait on the process group's lost peers.
            time.sleep(3)
            os._exit(RANK_LOST_EXIT_CODE)
        import tempfile
        import traceback

        path = Path(tempfile.gettempdir()) / f"dtrain-error-{os.getpid()}.txt"
        try:
            path.write_text(traceback.format_exc())
            where = f"traceback in {path}"
        except OSError:
            where = "rerun with DTRAIN_TRACEBACK=1 for the traceback"
        reason = " ".join(str(exc).split())[:300]
        print(
            f"dtrain: error: unexpected {type(exc).__name__}: {reason} ({where}; if your inputs look right, "
            "please report it)",
            file=sys.stderr,
            flush=True,
        )
        return 1

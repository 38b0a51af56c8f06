"""`python -m dtrain.launch_accelerate ARGS` is `accelerate launch ARGS` with a quiet ending.

When a rank fails, Accelerate's launcher raises (torchrun's ChildFailedError, or CalledProcessError for a
single process) and prints its own traceback under the rank's one-line error. `dtrain launch` runs this
instead, so the job ends with the rank's error, one line saying which rank failed, and that rank's own
exit code (2 for a user error, 75 for a stop on request, 137 for a rank killed by SIGKILL) rather than
the launcher's 1. When one rank dies the others lose contact with it (exit code 69, guards.py): the
rank that died is the one named. When the launcher
itself is signalled, it passes the signal to the ranks, which save and stop (dtrain.signals): the job
then ends with 75 too once the run has recorded that stop.

One process runs under `one_process`, not Accelerate's simple launcher: from Accelerate 1.16 that launcher
answers a SIGTERM by terminating the script and killing it 5 s later, which would cut a stop request's
checkpoint short. Here the signal is passed on and the script's own exit code (75) is the job's.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from dtrain.guards import RANK_LOST_EXIT_CODE
from dtrain.process import STOP_SIGNALS, run_forwarding_signals
from dtrain.signals import STOP_EXIT_CODE


def main(argv: list[str] | None = None) -> int:
    import accelerate.commands.launch as accelerate_launch
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    started = time.time()
    accelerate_launch.simple_launcher = one_process  # looked up by name in launch_command
    try:
        launch_command(args)
    except ChildFailedError as exc:
        rank, failure = root_failure(exc)
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # killed by a signal
        print(
            f"dtrain launch: rank {rank} exited with code {code}"
            f"{f' ({failure.signal_name()})' if failure.exitcode < 0 else ''}; the job was stopped",
            file=sys.stderr,
            flush=True,
        )
        return code
    except subprocess.CalledProcessError as exc:  # one process: its own error is already printed
        return exc.returncode if exc.returncode > 0 else 128 - exc.returncode
    except SignalException as exc:  # the launcher was signalled (Ctrl-C, scancel) and passed it to the ranks
        return _signalled(signal.Signals(exc.sigval), args, started)
    except SystemExit as exc:  # Accelerate >= 1.16 turns that signal into sys.exit(128 + signal)
        sig = _signal_of(exc.code)
        if sig is None:
            raise
        return _signalled(sig, args, started)
    return 0


def one_process(args) -> None:
    """Accelerate's simple launcher (one process, its environment from Accelerate's own
    `prepare_simple_launcher_cmd_env`), with the launcher's signals passed on to the script and no deadline:
    the script saves and exits on its own (the run's --train.collective_timeout_s and the scheduler's grace
    period bound it). A failure raises CalledProcessError with the script's exit code, as Accelerate's does."""
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    cmd, env = prepare_simple_launcher_cmd_env(args)
    code = run_forwarding_signals(cmd, env)
    if code != 0:
        raise subprocess.CalledProcessError(returncode=code, cmd=cmd)


def _signal_of(code) -> signal.Signals | None:
    """The signal a launcher's exit code 128 + N stands for, when N is one the ranks answer with a stop."""
    stops = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGQUIT)  # and torchrun's own two (PET_SIGNALS_TO_HANDLE)
    return next((s for s in stops if isinstance(code, int) and code == 128 + s), None)


def _signalled(sig: signal.Signals, args, started: float) -> int:
    if _stopped_on_request(args.training_script_args, started, wait_s=15):
        print(
            f"dtrain launch: stopped by {sig.name}; the ranks saved a checkpoint", file=sys.stderr, flush=True
        )
        return STOP_EXIT_CODE
    print(f"dtrain launch: stopped by {sig.name}", file=sys.stderr, flush=True)
    return 128 + int(sig)


def root_failure(exc) -> tuple:
    """The rank whose failure caused the others', in this order: a rank's own error exit (2, 65, 75, 1...);
    a death by a signal (SIGKILL from the OOM killer, SIGSEGV) no later than the first rank that lost
    contact with a peer; a rank that lost contact (RANK_LOST_EXIT_CODE, a consequence); last, the SIGTERM
    with which the launcher itself tears the remaining ranks down. Earliest first within each."""
    import signal

    failures = exc.failures.items()
    lost = [f.timestamp for _, f in failures if f.exitcode == RANK_LOST_EXIT_CODE]
    tiers = (
        [(r, f) for r, f in failures if f.exitcode > 0 and f.exitcode != RANK_LOST_EXIT_CODE],
        [
            (r, f)
            for r, f in failures
            if f.exitcode < 0 and f.exitcode != -signal.SIGTERM and (not lost or f.timestamp <= min(lost))
        ],
        [(r, f) for r, f in failures if f.exitcode == RANK_LOST_EXIT_CODE],
    )
    for tier in tiers:
        if tier:
            return min(tier, key=lambda item: item[1].timestamp)
    return exc.get_first_failure()


def _stopped_on_request(train_args: list[str], since: float, wait_s: float) -> bool:
    deadline = time.time() + wait_s
    while not _recorded_stop(train_args, since):
        if time.time() > deadline:
            return False
        time.sleep(1)
    return True


def _recorded_stop(train_args: list[str], since: float) -> bool:
    """Whether the run, since `since`, recorded a stop on request in its run_info.json (every rank stopped at
    an agreed step and a checkpoint was committed): then the job's exit code is the ranks' own. Rank 0 writes
    it before the ranks' last barrier; on another node of a shared file system it may show a moment later,
    hence the caller's short poll."""
    import datetime as dt
    import json
    from pathlib import Path

    from dtrain.config import UserError, parse_config

    try:
        out = Path(parse_config(list(train_args)).output_dir)
        info = json.loads((out / "run_info.json").read_text())
    except (UserError, OSError, ValueError):
        return False
    ended = (info["resumes"][-1] if info.get("resumes") else info).get("ended") or {}
    at = ended.get("at")
    return (
        ended.get("reason") == "stop_request"
        and at is not None
        and dt.datetime.fromisoformat(at).timestamp() >= since - 1
    )


if __name__ == "__main__":
    from dtrain.process import exit_with

    exit_with(main())

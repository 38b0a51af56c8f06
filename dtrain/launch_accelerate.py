"""`python -m dtrain.launch_accelerate ARGS` is `accelerate launch ARGS` with a quiet ending.

When a rank fails, Accelerate's launcher raises (torchrun's ChildFailedError, or CalledProcessError for a
single process) and prints its own traceback under the rank's one-line error. `dtrain launch` runs this
instead, so the job ends with the rank's error, one line saying which rank failed, and that rank's own
exit code (2 for a user error) rather than the launcher's 1.
"""

from __future__ import annotations

import signal
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        launch_command(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
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
    except SignalException as exc:  # the launcher itself was signalled (Ctrl-C, scancel): ranks are stopped
        print(f"dtrain launch: stopped by {signal.Signals(exc.sigval).name}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())

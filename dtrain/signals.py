"""Stop requests: a signal on any rank becomes a stop every rank agrees on, at an optimizer-step boundary.

SIGINT, SIGTERM, SIGUSR1 and SIGUSR2 only set a flag: no I/O, no logging, no collective in the handler
(that is how jobs hang). At each step boundary every rank calls `StopRequest.agreed()`, which reads the
result of a one-integer MAX all-reduce started at the previous boundary and starts the next one. It runs
on a gloo group on the CPU, so it never waits on the GPU, and it overlaps a whole step, so it costs no
host sync: a request is acted on one step after it lands, by every rank at the same step, even when the
signal reached one rank only (Slurm signals one process; launchers forward some signals and not others).
The loop then saves a checkpoint through the commit protocol and the run exits with STOP_EXIT_CODE.
A second SIGINT exits at once. A signal that lands during a save only sets the flag: the save finishes.
"""

from __future__ import annotations

import os
import signal

import torch

from dtrain.process import STOP_SIGNALS

STOP_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, a checkpoint saved; rerun the same command to resume


class StopRequest:
    """The stop flag of this rank and the agreement between ranks. Every rank builds one (collectively)."""

    def __init__(self, accelerator, timeout_s: float = 1800):
        self.signum = 0  # the first stop signal received by this rank
        self._group: torch.distributed.ProcessGroup | None = None
        self._work: torch.distributed.Work | None = None  # the round in flight, reducing _vote
        self._vote: torch.Tensor | None = None
        if accelerator.num_processes > 1:
            import datetime

            import torch.distributed as dist

            # CPU: agreeing never waits on a device. The timeout is the run's (a new group's is its own).
            self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum, _frame) -> None:
        if self.signum and signum == signal.SIGINT:  # Ctrl-C twice: stop now, whatever is running
            os._exit(128 + signal.SIGINT)
        self.signum = self.signum or signum

    def agreed(self) -> str | None:
        """The name of a stop signal some rank received before the previous boundary, else None. Called at
        every step boundary by every rank (it is a collective)."""
        if self._group is None:
            return _name(self.signum)
        decided = 0
        if self._work is not None:
            assert self._vote is not None  # started together with _work
            self._work.wait()
            decided = int(self._vote.item())  # a CPU tensor: no device sync
        import torch.distributed as dist

        self._vote = torch.tensor([self.signum], dtype=torch.int32)
        self._work = dist.all_reduce(self._vote, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return _name(decided)

    def close(self) -> None:
        """Finish the round in flight (every rank started it) and give the signals back."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _name(signum: int) -> str | None:
    return signal.Signals(signum).name if signum else None

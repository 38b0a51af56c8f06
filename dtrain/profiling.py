"""`--log.profile_steps A-B`: torch.profiler over optimizer steps A..B (numbered as logged, so the same
after a resume), one Chrome-trace JSON per rank (Perfetto opens it) in <output_dir>/profile/, on CUDA a
memory snapshot for PyTorch's memory viewer (https://pytorch.org/memory_viz), and the top operators by
self time in the log (main process).

The loop calls `begin(step)` before each step and `end(step)` after it. Off (null), `step_profiler`
returns `OFF`, whose methods do nothing: no profiler object, no context manager per step. Each recorded
step is a `record_function("step N")` range in the trace (category user_annotation), so it can be found.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from dtrain.config import LogConfig, profile_range

TOP_OPERATORS = 12  # rows of the log's table


class StepProfiler:
    """The no-op profiler: what the loop calls when --log.profile_steps is null (cheap method calls)."""

    def begin(self, step: int) -> None:
        """Before optimizer step `step` (its data window included)."""

    def end(self, step: int) -> None:
        """After optimizer step `step`."""

    def close(self) -> None:
        """The run ends (finished, stopped, halted): write what was recorded, if anything is open."""


OFF = StepProfiler()


class RangeProfiler(StepProfiler):
    """Records steps first..last; starts at the first of them the run reaches (a resume inside the range
    records the rest) and writes its files after `last`, at the run's last step, or on `close`."""

    def __init__(self, first: int, last: int, max_steps: int, out: Path, rank: int, write, device) -> None:
        self.first, self.last = first, min(last, max_steps)  # a run that ends inside the range stops there
        self.out, self.rank, self.write, self.device = out, rank, write, device
        self.prof: torch.profiler.profile | None = None
        self.marker: contextlib.AbstractContextManager | None = None
        self.recorded: list[int] = []
        self.done = False

    @property
    def name(self) -> str:
        return f"rank{self.rank}_steps{self.first}-{self.last}"

    def begin(self, step: int) -> None:
        if self.done or not self.first <= step <= self.last:
            return
        if self.prof is None:
            self._start()
        self.marker = torch.profiler.record_function(f"step {step}")
        self.marker.__enter__()
        self.recorded.append(step)

    def end(self, step: int) -> None:
        if self.marker is not None:
            self.marker.__exit__(None, None, None)
            self.marker = None
        if self.prof is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        if self.marker is not None:  # closed mid-step (an error path): end the step's range first
            self.marker.__exit__(None, None, None)
            self.marker = None
        if self.prof is None or self.done:
            return
        self.done = True
        prof, self.prof = self.prof, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the trace holds every kernel of the last step
        prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"trace_{self.name}.json"
        prof.export_chrome_trace(str(trace))
        snapshot = self._dump_memory()
        steps = f"{self.recorded[0]}-{self.recorded[-1]}" if self.recorded else "none"
        self.write(
            f"dtrain: profiled steps {steps}: trace {trace}" + (f", memory {snapshot}" if snapshot else "")
        )
        self.write(top_operators(prof, self.device.type == "cuda"))

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self.prof.__enter__()

    def _dump_memory(self) -> Path | None:
        """CUDA only: the allocations of the recorded steps, for pytorch.org/memory_viz."""
        if self.device.type != "cuda":
            return None
        path = self.out / f"memory_{self.name}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
        return path


def top_operators(prof: torch.profiler.profile, cuda: bool, rows: int = TOP_OPERATORS) -> str:
    """The operators with the most self time over the recorded steps (device time on CUDA), as one short
    table: where a step's time goes, without opening the trace."""
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = [e for e in prof.key_averages() if not e.key.startswith("step ")]
    total = sum(getattr(e, attr) for e in ops) or 1.0
    ops.sort(key=lambda e: getattr(e, attr), reverse=True)
    lines = [
        f"{'operator (self ' + ('CUDA' if cuda else 'CPU') + ' time)':<48} {'ms':>9} {'share':>6} {'calls':>6}"
    ]
    for e in ops[:rows]:
        us = getattr(e, attr)
        lines.append(f"{e.key[:48]:<48} {us / 1e3:>9.1f} {us / total:>6.1%} {e.count:>6}")
    return "\n".join(lines)


def step_profiler(log: LogConfig, accelerator, output_dir: Path, max_steps: int, write) -> StepProfiler:
    """OFF unless --log.profile_steps is set. `write` is the run's log (the main process prints)."""
    steps = profile_range(log.profile_steps) if log.profile_steps is not None else None
    if steps is None:
        return OFF
    first, last = steps
    if first > max_steps:
        write(f"dtrain: --log.profile_steps {log.profile_steps} starts after the run's last step {max_steps}")
        return OFF
    return RangeProfiler(
        first, last, max_steps, output_dir / "profile", accelerator.process_index, write, accelerator.device
    )

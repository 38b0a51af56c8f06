"""--log.profile_steps (dtrain/profiling.py): one Chrome trace per rank whose step ranges are exactly the
profiled steps, the operator table in the main process's log, and a profiler that starts on resume inside
its range and closes when the run ends inside it. The 2-rank run is the shared `straight_long_ddp` (it
profiles steps 3-4; the resume tests compare its losses bitwise with unprofiled runs)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dtrain.config import LogConfig
from dtrain.profiling import OFF, RangeProfiler, step_profiler


def step_spans(trace: Path) -> dict[int, tuple[float, float]]:
    """step number -> (start, end) in microseconds of the trace's `step N` ranges."""
    events = json.loads(trace.read_text())["traceEvents"]
    spans = {}
    for e in events:
        if e.get("cat") == "user_annotation" and e.get("name", "").startswith("step "):
            step = int(e["name"].split()[1])
            assert step not in spans, f"step {step} marked twice in {trace.name}"
            spans[step] = (e["ts"], e["ts"] + e["dur"])
    return spans


def ops_within(trace: Path, span: tuple[float, float]) -> set[str]:
    events = json.loads(trace.read_text())["traceEvents"]
    kinds = ("cpu_op", "user_annotation")  # operators, and ranges such as Optimizer.step#AdamW.step
    return {e["name"] for e in events if e.get("cat") in kinds and span[0] <= e["ts"] <= span[1]}


def test_two_ranks_write_one_trace_each_covering_exactly_steps_3_and_4(straight_long_ddp):
    profile = straight_long_ddp / "profile"
    traces = sorted(p.name for p in profile.iterdir())
    assert traces == ["trace_rank0_steps3-4.json", "trace_rank1_steps3-4.json"]  # no memory snapshot on CPU
    for name in traces:
        spans = step_spans(profile / name)
        assert sorted(spans) == [3, 4], name
        assert spans[3][1] <= spans[4][0]  # in order, not nested
        for step in (3, 4):  # each range holds the step's work: forward, backward, the optimizer
            ops = ops_within(profile / name, spans[step])
            assert {"aten::mm", "aten::_log_softmax"} <= ops, (name, step)
            assert any(op.startswith("Optimizer.step") for op in ops), (name, step)
    log = (straight_long_ddp / "log.txt").read_text()
    assert log.count("operator (self CPU time)") == 1  # the main process's table only
    assert f"profiled steps 3-4: trace {profile / 'trace_rank0_steps3-4.json'}" in log


def fake_run(tmp_path: Path, first: int, last: int, max_steps: int):
    lines: list[str] = []
    prof = RangeProfiler(first, last, max_steps, tmp_path / "profile", 0, lines.append, torch.device("cpu"))
    return prof, lines


def steps_of(prof: RangeProfiler, steps: range) -> None:
    for step in steps:
        prof.begin(step)
        torch.randn(8, 8).sum()
        prof.end(step)


def test_a_resume_inside_the_range_records_the_rest_and_the_last_step_closes_it(tmp_path):
    prof, lines = fake_run(tmp_path, first=3, last=9, max_steps=6)  # resumed at step 4; the run ends at 6
    steps_of(prof, range(5, 8))
    trace = tmp_path / "profile" / "trace_rank0_steps3-6.json"
    assert sorted(step_spans(trace)) == [5, 6]  # written at the run's last step, before any close()
    assert "profiled steps 5-6" in lines[0] and "aten::randn" in lines[1]
    prof.close()  # finish() closes again: nothing more is written
    assert len(lines) == 2


def test_a_stop_inside_the_range_writes_what_was_recorded(tmp_path):
    prof, lines = fake_run(tmp_path, first=2, last=5, max_steps=100)
    steps_of(prof, range(1, 4))
    assert not (tmp_path / "profile").exists()  # still recording
    prof.close()  # end_early: a stop request at step 3
    assert sorted(step_spans(tmp_path / "profile" / "trace_rank0_steps2-5.json")) == [2, 3]


@pytest.mark.parametrize(("steps", "max_steps"), [(None, 10), ("20-30", 10)])
def test_off_is_the_no_op_profiler(steps, max_steps, tmp_path):
    lines: list[str] = []
    acc = SimpleNamespace(process_index=0, device=torch.device("cpu"))
    assert step_profiler(LogConfig(profile_steps=steps), acc, tmp_path, max_steps, lines.append) is OFF
    assert bool(lines) == (steps is not None)  # a range past the end is said, once

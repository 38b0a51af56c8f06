"""Stop requests (dtrain.signals), for real: a signal to one process or to the launcher stops every rank at
one agreed step with a committed checkpoint and exit code 75, and rerunning the same command resumes with
losses bitwise equal to an uninterrupted run. One process, and 2 CPU ranks under `dtrain launch ddp`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    LONG_DDP,
    REPO,
    TINY,
    TRAIN,
    assert_ok,
    dtrain_launch,
    env_for_subprocess,
    launch_cmd,
    run_train,
    train_rows,
)

from dtrain.background_save import DELAY_ENV
from dtrain.checkpoint import TMP_PREFIX, verify
from dtrain.signals import STOP_EXIT_CODE

pytestmark = pytest.mark.slow

STEPS = 500  # long enough to signal one process mid-run on 2 cores; the smoke model does ~100 steps/s
SHAPE = [
    *TINY,
    "--train.max_steps",
    str(STEPS),
    "--checkpoint.save_steps",
    "0",
    "--eval.steps",
    "0",
    "--eval.num_generate",
    "0",
    "--log.every_steps",
    "1",
    "--data.synthetic_train_examples",
    "2000",
]
EXIT_BOUND_S = 60  # from the signal to every process gone


def _start(cmd: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env_for_subprocess(**env),
    )


def _wait_for_save_in_flight(out: Path, proc: subprocess.Popen, ranks: int = 2) -> str:
    """The name of the checkpoint a background save is writing, once every rank's files are in its temporary
    directory (the writers then hold, DELAY_ENV seconds, before they agree and commit)."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        for tmp in (out / "checkpoints").glob(f"{TMP_PREFIX}step-*"):
            if len(list((tmp / "rng").glob("rank-*.pt"))) == ranks:
                return tmp.name.removeprefix(TMP_PREFIX)
        time.sleep(0.02)
    raise AssertionError("no background save was seen in flight")


def _wait_for_rows(out: Path, proc: subprocess.Popen, n: int = 3) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        path = out / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(
        f"training never logged {n} rows:\n{proc.stdout.read() if proc.poll() is not None else ''}"
    )


def _processes(out: Path) -> dict[int, tuple[list[bytes], dict[bytes, bytes]]]:
    """pid -> (command line, environment) of the live processes working on the run in `out`."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = dict(
                kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv
            )
        except OSError:
            continue
        if str(out).encode() in cmdline:
            found[int(proc.name)] = (cmdline, environ)
    return found


def _ranks(out: Path) -> dict[int, int]:
    """rank -> pid of the live training processes of the run in `out`."""
    return {
        int(env[b"RANK"]): pid
        for pid, (cmdline, env) in _processes(out).items()
        if str(TRAIN).encode() in cmdline and b"RANK" in env
    }


def _kill_leftovers(out: Path) -> None:
    """The launcher runs torchrun in its own session: a failed test must not leave the job running."""
    for pid in _processes(out):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _steps(out: Path) -> int:
    return json.loads((out / "run_info.json").read_text())["config"]["train.max_steps"]


def _stop_and_check(proc: subprocess.Popen, out: Path, send) -> dict:
    """Signal (via `send`), wait, and check: exit 75 within the bound, nothing left running, the agreed
    step's checkpoint committed and recorded in run_info.json."""
    sent = time.time()
    send()
    try:
        output, _ = proc.communicate(timeout=EXIT_BOUND_S)
        assert time.time() - sent < EXIT_BOUND_S
        assert not _processes(out), "a process of the job outlived it"
    finally:
        proc.kill()
        _kill_leftovers(out)
    assert proc.returncode == STOP_EXIT_CODE, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    ended = (info["resumes"][-1] if info.get("resumes") else info)["ended"]  # this start's end
    assert ended["reason"] == "stop_request"
    step = ended["step"]
    assert 0 < step < _steps(out)
    assert [r["step"] for r in train_rows(out)] == list(range(1, step + 1))  # the stop step is the last
    marker = json.loads((out / "checkpoints" / f"step-{step:08d}" / "dtrain_checkpoint.json").read_text())
    assert marker["step"] == step
    assert f"stopped by {ended['signal']} at step {step}" in output
    return ended


def _resumes_exactly(out: Path, straight: Path, again) -> None:
    proc = again()
    assert_ok(proc)
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, _steps(out) + 1))  # every step logged once
    reference = {r["step"]: r["loss"] for r in train_rows(straight)}
    assert {r["step"]: r["loss"] for r in rows} == reference  # bitwise
    info = json.loads((out / "run_info.json").read_text())
    assert info["resumes"][-1]["ended"]["reason"] == "finished"


@pytest.fixture(scope="module")
def straight_single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    assert_ok(run_train([*SHAPE, "--output_dir", str(out)]))
    return out


def test_one_process_stops_saves_and_resumes_exactly(straight_single, tmp_path):
    """One run stopped twice, each time rerun with the same command: SIGTERM to `dtrain launch single_gpu`
    while its stop's checkpoint takes 7 s to write (saved in the background, the writer held by the test-only
    delay: Accelerate 1.16's own one-process launcher would kill the script 5 s after passing SIGTERM on),
    then SIGINT to the script itself."""
    out = tmp_path / "run"
    args = [*SHAPE, "--checkpoint.async_save", "true", "--output_dir", str(out)]
    for sig in (signal.SIGTERM, signal.SIGINT):
        if sig == signal.SIGTERM:
            proc = _start(launch_cmd("single_gpu", args, gpus=1), **{DELAY_ENV: "7"})
        else:
            proc = _start([sys.executable, str(TRAIN), *args])
        _wait_for_rows(out, proc, _logged(out) + 3)
        sent = time.time()
        ended = _stop_and_check(proc, out, lambda p=proc, s=sig: p.send_signal(s))
        assert ended["signal"] == sig.name
        if sig == signal.SIGTERM:
            assert time.time() - sent > 7  # the stop's save was written, not cut short
    _resumes_exactly(out, straight_single, lambda: run_train(args))


def test_two_ranks_stop_at_one_step_and_resume_exactly(straight_long_ddp, tmp_path):
    """One `dtrain launch ddp` job stopped three times, each time rerun with the same command: SIGTERM to
    the launcher, SIGINT to the launcher, SIGUSR1 to rank 1 only. 120 steps at ~8 steps/s on 2 gloo
    ranks: each signal lands mid-run (3 rows after the start or resume). The job saves in the background
    (--checkpoint.async_save): the SIGTERM lands while a save is in flight (the writers held open by the
    test-only delay), and both that checkpoint and the stop's own are committed before exit 75."""
    out = tmp_path / "run"
    args = [*LONG_DDP, "--checkpoint.async_save", "true", "--output_dir", str(out)]
    for how in ("SIGTERM to the launcher", "SIGINT to the launcher", "SIGUSR1 to rank 1 only"):
        first = how.startswith("SIGTERM")
        proc = _start(launch_cmd("ddp", args), **({DELAY_ENV: "3"} if first else {}))
        if first:
            in_flight = _wait_for_save_in_flight(out, proc)
        else:
            _wait_for_rows(out, proc, _logged(out) + 3)
        if how.endswith("rank 1 only"):
            ranks = _ranks(out)
            assert sorted(ranks) == [0, 1], ranks
            send = lambda pid=ranks[1]: os.kill(pid, signal.SIGUSR1)  # noqa: E731
        else:
            sig = signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT
            send = lambda p=proc, s=sig: p.send_signal(s)  # noqa: E731
        ended = _stop_and_check(proc, out, send)
        assert ended["signal"] == how.split()[0], how
        if first:  # the save in flight landed too, before the stop's own
            assert verify(out / "checkpoints" / in_flight) is None, in_flight
            assert ended["step"] > int(in_flight.split("-")[1])
    _resumes_exactly(out, straight_long_ddp, lambda: dtrain_launch("ddp", args))


def test_the_handler_only_sets_a_flag_and_the_handlers_are_given_back():
    """In-process, one process (no group): the first stop signal is kept, later ones do not replace it,
    and close() restores whatever handlers were there before."""
    from types import SimpleNamespace

    from dtrain.signals import StopRequest

    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest(SimpleNamespace(num_processes=1))
    try:
        assert stop.agreed() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # would end this test process, were it not handled
        assert stop.agreed() == "SIGUSR1"
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR1) is before

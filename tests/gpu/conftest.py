"""The GPU suite's plumbing: every test under tests/gpu is marked `gpu` and skipped, with the reason, where
CUDA is not available (so the CPU suite and CI are unchanged); the shared runs (`runs`, common.RunPool); the
figures tests record (`figure`); and, when DTRAIN_GPU_REPORT names a file, every test's outcome, time and
figures written there for tests/gpu/report.py (`make test-gpu` sets it)."""

from __future__ import annotations

import datetime as dt
import json
import os
from importlib import metadata
from pathlib import Path

import pytest
import torch

from .common import CUDA, FIGURES, NO_CUDA, RUN_SECONDS, RunPool, attention

HERE = Path(__file__).resolve().parent
REPORT_ENV = "DTRAIN_GPU_REPORT"
CHECKS: dict[str, str] = {}  # node id -> what the test proves (its docstring's first line)
OUTCOMES: dict[str, dict] = {}
STARTED = dt.datetime.now(dt.timezone.utc)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE not in Path(item.path).parents:
            continue
        item.add_marker(pytest.mark.gpu)
        doc = (getattr(item, "function", None) and item.function.__doc__) or item.name
        CHECKS[item.nodeid] = " ".join(doc.strip().split("\n\n")[0].split())
        if not CUDA:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


def pytest_runtest_logreport(report):
    if report.nodeid not in CHECKS:
        return
    got = OUTCOMES.setdefault(report.nodeid, {"outcome": "passed", "seconds": 0.0, "reason": ""})
    got["seconds"] = round(got["seconds"] + report.duration, 1)
    if report.skipped:
        got["outcome"] = "skipped"
        longrepr = report.longrepr
        got["reason"] = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr).removeprefix(
            "Skipped: "
        )
    elif report.failed:
        got["outcome"] = "failed" if report.when == "call" else "error"
        lines = [ln for ln in report.longreprtext.splitlines() if ln.startswith("E ")]
        got["reason"] = " ".join((lines[0] if lines else report.longreprtext.strip()[-300:]).split())[:300]


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(REPORT_ENV)
    if not path or not CHECKS:
        return
    versions: dict[str, str | None] = {}
    for pkg in (
        "torch",
        "transformers",
        "accelerate",
        "peft",
        "bitsandbytes",
        "torchao",
        "deepspeed",
        "flash_attn",
    ):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    record = {
        "started": STARTED.isoformat(timespec="seconds"),
        "seconds": round((dt.datetime.now(dt.timezone.utc) - STARTED).total_seconds(), 1),
        "cuda": CUDA,
        "device": torch.cuda.get_device_name(0) if CUDA else None,
        "attention": attention() if CUDA else None,
        "versions": versions,
        "exitstatus": int(exitstatus),
        "tests": [
            {
                "nodeid": nodeid,
                "check": check,
                **OUTCOMES.get(nodeid, {"outcome": "not run"}),
                "figures": FIGURES.get(nodeid, {}),
            }
            for nodeid, check in CHECKS.items()
        ],
        "runs": dict(sorted(RUN_SECONDS.items())),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1, default=str))


@pytest.fixture(scope="session")
def runs(request, tmp_path_factory):
    """Every run the selected tests name (`common.uses`), started together on first use, each once."""
    wanted = [
        name for item in request.session.items for m in item.iter_markers("gpu_runs") for name in m.args
    ]
    pool = RunPool(tmp_path_factory.mktemp("gpu-runs"), wanted)
    yield pool
    pool.close()


@pytest.fixture
def figure(request):
    """figure(name, value): a number (or a word) the report shows beside this test's outcome."""

    def record(name: str, value) -> None:
        if isinstance(value, float):
            value = float(f"{value:.4g}")
        FIGURES.setdefault(request.node.nodeid, {})[name] = value

    return record

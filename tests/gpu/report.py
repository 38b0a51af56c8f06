"""The one table `make test-gpu` ends with: every check of the GPU suite (tests/gpu) and of `bench/run.py
--gpu`, passed or not, with its figures and times.

    python tests/gpu/report.py runs/test-gpu      # reads gpu_checks.json and bench_gpu.json there

Exit status 1 when a check failed, or when a part that should have run left no results (the bench is
expected only where the suite found CUDA); 0 otherwise, so a machine without a GPU, where every test is
skipped and the bench not started, passes. The benchmark's speed goals are shown (met or not), not judged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BUDGET_S = 8 * 60  # the whole of `make test-gpu` on one H100/H200 (issue 22)


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def suite_rows(suite: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for t in suite["tests"]:
        module, _, name = t["nodeid"].partition("::")
        number = Path(module).stem.removeprefix("test_").split("_", 1)[0]
        figures = ", ".join(f"{k} {fmt(v)}" for k, v in t.get("figures", {}).items())
        detail = figures if t["outcome"] == "passed" else (t.get("reason") or figures)
        label = f"{number}. {t['check']}" + (f" [{name.partition('[')[2][:-1]}]" if "[" in name else "")
        rows.append((label, t["outcome"], fmt(t.get("seconds", "")), detail))
    return rows


def bench_rows(bench: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for sec in bench.get("sections", []):
        for kind in ("cases", "checks"):
            for key, case in sec.get(kind, {}).items():
                s = case.get("summary", {})
                first = case["repeats"][0] if case.get("repeats") else {}
                figures = []
                for k, label in (
                    ("tokens_per_sec", "tokens/s"),
                    ("mfu_logged", "MFU logged"),
                    ("mfu", "MFU"),
                ):
                    if s.get(k) is not None:
                        figures.append(f"{label} {fmt(s[k])}")
                if first.get("loss_first") is not None:
                    figures.append(f"loss {fmt(first['loss_first'])} -> {fmt(first['loss_last'])}")
                status = "passed" if case["status"] == "ok" else case["status"]
                detail = ", ".join(figures) if status == "passed" else case.get("error", "")[:300]
                rows.append((f"bench {key}: {case['label']}", status, fmt(first.get("wall_s", "")), detail))
        for g in sec.get("goals", []):
            met = {True: "met", False: "not met", None: "not judged"}[g["met"]]
            rows.append((f"bench goal: {g['goal']} {g['target']}", met, "", fmt(g["value"])))
    return rows


def main(argv: list[str]) -> int:
    where = Path(argv[0] if argv else "runs/test-gpu")
    suite_path, bench_path = where / "gpu_checks.json", where / "bench_gpu.json"
    rows, notes, bad = [], [], False
    suite = json.loads(suite_path.read_text()) if suite_path.is_file() else None
    if suite is None:
        notes.append(f"no {suite_path}: the GPU suite did not finish (see pytest's output above)")
        bad = True
    else:
        rows += suite_rows(suite)
        bad |= any(t["outcome"] in ("failed", "error") for t in suite["tests"])
        where_ran = suite["device"] or "no CUDA GPU"
        notes.append(
            f"suite: {len(suite['tests'])} tests in {suite['seconds']:.0f} s on {where_ran} ({suite['started']})"
        )
        if suite.get("runs"):
            notes.append(
                "runs (s, side by side): " + ", ".join(f"{k} {v:.0f}" for k, v in suite["runs"].items())
            )
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    if bench is not None:
        rows += bench_rows(bench)
        bad |= bool(bench.get("failed"))
        notes.append(f"bench --gpu: {bench['duration_s']:.0f} s ({bench['machine']['device']})")
    elif suite is not None and suite["cuda"]:
        notes.append(f"no {bench_path}: bench/run.py --gpu did not finish (see its output above)")
        bad = True
    else:
        rows.append(("bench/run.py --gpu", "not run", "", "no CUDA GPU"))
    total = (suite or {}).get("seconds", 0) + (bench or {}).get("duration_s", 0)
    if suite is not None and suite["cuda"]:
        notes.append(
            f"total {total:.0f} s of a {BUDGET_S} s budget" + (" (over)" if total > BUDGET_S else "")
        )
    show(rows, notes)
    return 1 if bad else 0


def show(rows: list[tuple[str, str, str, str]], notes: list[str]) -> None:
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:  # the bench extra is not installed: plain text
        for row in rows:
            print(" | ".join(row))
        print("\n".join(notes))
        return
    colour = {
        "passed": "green",
        "met": "green",
        "failed": "red",
        "error": "red",
        "not met": "red",
        "skipped": "yellow",
    }
    table = Table(title="make test-gpu", title_justify="left")
    for col in ("check", "result", "s", "figures (or why)"):
        table.add_column(col, overflow="fold")
    for check, outcome, seconds, detail in rows:
        table.add_row(escape(check), f"[{colour.get(outcome, 'white')}]{outcome}[/]", seconds, escape(detail))
    console = Console()
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

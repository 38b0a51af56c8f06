"""A run's curves as PNGs, read back from its directory (metrics.jsonl, run_info.json, config.yaml).

    dtrain plot runs/x                       # -> runs/x/plots/*.png and runs/x/summary.md
    dtrain plot runs/a runs/b --out cmp/     # the runs overlaid, one curve per run, named in the legend
    dtrain plot-lr --config R.yaml --optim.scheduler wsd --out lr.png

Everything is read from files, so a finished, stopped or killed run draws alike: a torn last line or a
missing file costs only the plots that need it, each skipped plot said in one line. matplotlib (extra
`plot`) is imported inside the functions that draw, with the Agg canvas and no pyplot (no GUI, no global
figure state), so importing this module costs nothing and a run without matplotlib still trains.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dtrain.cli import Parser
from dtrain.config import UserError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Say = Callable[[str], None]
Counts = dict[str, dict[str, int]]  # png name -> {curve label: plotted points}

PLOTS_OFF = "plots are off: matplotlib is not installed (pip install 'dtrain[plot]')"
EMA_WEIGHT = 0.6  # TensorBoard's default smoothing
PLOTS_DIR = "plots"


# --------------------------------------------------------------------------------------------
# Reading a run directory
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class RunFiles:
    """What one run directory holds, read once: rows in file order, the config, run_info.json."""

    path: Path
    rows: list[dict] = field(default_factory=list)
    torn: int = 0  # lines of metrics.jsonl that were not JSON (a kill mid-write)
    config: dict = field(default_factory=dict)  # config.yaml, nested; {} when absent
    info: dict = field(default_factory=dict)  # run_info.json; {} when absent
    has_metrics: bool = False

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)

    def setting(self, dotted: str) -> Any:
        """A config value by dotted key, from config.yaml or else run_info.json's flat copy; None if neither."""
        node: Any = self.config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            node = self.info.get("config", {}).get(dotted)
        return node

    @cached_property
    def _train(self) -> list[dict]:
        return _by_step(r for r in self.rows if "loss" in r and not r.get("nonfinite"))

    @cached_property
    def _eval(self) -> list[dict]:
        return _by_step(r for r in self.rows if any(k.startswith("eval_") for k in r))

    def train_rows(self) -> list[dict]:
        """The train rows by step; a step logged twice (a run resumed past a torn log) keeps its last row."""
        return self._train

    def eval_rows(self) -> list[dict]:
        return self._eval

    def series(self, key: str, x: str = "step", rows: list[dict] | None = None) -> tuple[list, list]:
        """(xs, ys) of the rows holding a finite `key` (and `x`)."""
        pairs = [
            (r[x], r[key])
            for r in (self.train_rows() if rows is None else rows)
            if _finite(r.get(key)) and _finite(r.get(x))
        ]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _by_step(rows) -> list[dict]:
    last: dict[int, dict] = {}
    for r in rows:
        if isinstance(r.get("step"), int):
            last[r["step"]] = r
    return [last[s] for s in sorted(last)]


def read_run(path: str | os.PathLike) -> RunFiles:
    """Read a run directory; refuses (UserError) a path that holds none of a run's files."""
    p = Path(path)
    names = ("metrics.jsonl", "run_info.json", "config.yaml")
    if not p.is_dir() or not any((p / n).is_file() for n in names):
        raise UserError(
            f"RUN_DIR '{path}' is not a dtrain run directory (no metrics.jsonl, run_info.json or config.yaml); "
            "give the --output_dir of a run"
        )
    run = RunFiles(p, config=_read_yaml(p / "config.yaml"), info=_read_json(p / "run_info.json"))
    metrics = p / "metrics.jsonl"
    if metrics.is_file():
        run.has_metrics = True
        for line in metrics.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                run.torn += 1
                continue
            if isinstance(row, dict):
                run.rows.append(row)
    return run


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------------------------
# What the curves are made of
# --------------------------------------------------------------------------------------------


def ema(values: list[float], weight: float = EMA_WEIGHT) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average debiased by 1 - weight^t, so the first
    points are not dragged towards zero."""
    out, last = [], 0.0
    for t, v in enumerate(values, 1):
        last = last * weight + (1.0 - weight) * v
        out.append(last / (1.0 - weight**t) if weight < 1.0 else last)
    return out


def events(run: RunFiles) -> dict[str, list[int]]:
    """The steps to mark: non-finite, skipped (fp16) and empty steps, resumes and rollbacks. Counters on
    train rows are cumulative, so a step is marked where its counter rose."""
    marks: dict[str, list[int]] = {"nonfinite": [], "skipped": [], "empty": [], "resume": [], "rollback": []}
    for r in run.rows:
        if r.get("nonfinite") and isinstance(r.get("step"), int):
            marks["rollback" if r.get("action") == "rollback" else "nonfinite"].append(r["step"])
    for key, name in (("skipped_steps", "skipped"), ("empty_steps", "empty")):
        before = 0
        for r in run.train_rows():
            if _finite(r.get(key)) and r[key] > before:
                marks[name].append(r["step"])
                before = r[key]
    marks["resume"] = resume_steps(run)
    return {k: sorted(set(v)) for k, v in marks.items()}


def resume_steps(run: RunFiles) -> list[int]:
    """Where the run was resumed: run_info.json (resumed_from, resumes[]) and a train step going back in
    metrics.jsonl that no rollback explains."""
    steps = []
    for info in [run.info, *run.info.get("resumes", [])]:
        start = info.get("resumed_from") if isinstance(info, dict) else None
        if isinstance(start, dict) and isinstance(start.get("step"), int):
            steps.append(start["step"])
    last, rolled = None, False
    for r in run.rows:
        if r.get("nonfinite") and r.get("action") == "rollback":
            rolled = True
        elif "loss" in r and isinstance(r.get("step"), int):
            if last is not None and r["step"] <= last and not rolled:
                steps.append(r["step"] - 1)
            last, rolled = r["step"], False
    return steps


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


class PlotsUnavailable(UserError):
    """matplotlib is not installed."""


def matplotlib_figure() -> Figure:
    """A new Agg figure (imported here: matplotlib is optional)."""
    try:
        importlib.import_module("matplotlib")  # first: its submodules may be in sys.modules already
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailable(PLOTS_OFF) from None
    fig = Figure(figsize=(7.0, 4.0), dpi=90)
    fig.subplots_adjust(
        left=0.12, right=0.97, top=0.91, bottom=0.13
    )  # fixed: a layout engine costs half the time
    FigureCanvasAgg(fig)
    return fig


def figure_counts(fig: Figure) -> dict[str, int]:
    """Per labelled curve, the points it plots (finite x and y), read from the figure's Line2D objects;
    a labelled shaded span counts 1. What the tests check the content of a PNG by."""
    import numpy as np

    counts: dict[str, int] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            label = str(line.get_label())
            if label.startswith("_"):
                continue
            xs = np.asarray(line.get_xdata(), dtype=float)
            ys = np.asarray(line.get_ydata(), dtype=float)
            counts[label] = counts.get(label, 0) + int(np.count_nonzero(np.isfinite(xs) & np.isfinite(ys)))
        for patch in ax.patches:
            label = str(patch.get_label())
            if not label.startswith("_"):
                counts[label] = counts.get(label, 0) + 1
    return counts


def save(fig: Figure, path: Path) -> dict[str, int]:
    """Count the curves, then write the PNG atomically (a reader never sees half a file)."""
    counts = figure_counts(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fig.canvas.print_png(fh)  # type: ignore[attr-defined]  # an Agg canvas (matplotlib_figure)
    os.replace(tmp, path)
    return counts


def _axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    fig = matplotlib_figure()
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _finish(ax: Axes) -> None:
    if any(not str(h.get_label()).startswith("_") for h in [*ax.get_lines(), *ax.patches]):
        ax.legend(fontsize="small")


@dataclass
class Plot:
    """One PNG: what it needs from each run (the runs without it are left out) and how to draw one run."""

    png: str
    what: str  # "no <what> in RUN" when a run has none
    has: Callable[[RunFiles], bool]
    draw: Callable[[Axes, RunFiles, str], None]  # (axes, run, curve-label prefix)
    title: str
    xlabel: str = "step"
    ylabel: str = ""
    optional: bool = False  # absent by design on some runs (MFU off CUDA, no task metric): skipped silently
    after: Callable[[Axes, list[RunFiles]], None] | None = None


def _train_loss(x: str) -> Callable[[Axes, RunFiles, str], None]:
    def draw(ax: Axes, run: RunFiles, prefix: str) -> None:
        xs, ys = run.series("loss", x)
        (raw,) = ax.plot(xs, ys, alpha=0.35, linewidth=1, label=f"{prefix}loss (raw)")
        ax.plot(xs, ema(ys), color=raw.get_color(), label=f"{prefix}loss (EMA {EMA_WEIGHT})")
        if x == "step":
            _mark_events(ax, run, prefix)

    return draw


MARKERS = {"nonfinite": "x", "skipped": "v", "empty": "o", "resume": "D", "rollback": "<"}


def _mark_events(ax: Axes, run: RunFiles, prefix: str) -> None:
    """Events as markers along the top of the axes (one curve per kind); resumes and rollbacks also as
    dashed vertical lines."""
    for kind, steps in events(run).items():
        if not steps:
            continue
        ax.plot(
            steps,
            [0.97] * len(steps),
            linestyle="none",
            marker=MARKERS[kind],
            color="tab:red" if kind in ("nonfinite", "rollback") else "tab:gray",
            transform=ax.get_xaxis_transform(),
            label=f"{prefix}{kind} steps" if kind not in ("resume", "rollback") else f"{prefix}{kind}s",
        )
        if kind in ("resume", "rollback"):
            for s in steps:
                ax.axvline(s, linestyle="--", linewidth=0.8, color="tab:gray", label="_nolegend_")


def _keys(run: RunFiles, base: str) -> list[str]:
    """`base` and its per-source or per-task variants (`eval_loss/<name>`), in first-seen order."""
    seen: dict[str, None] = {}
    for r in run.eval_rows():
        for k in r:
            if (k == base or k.startswith(base + "/")) and _finite(r[k]):
                seen[k] = None
    return list(seen)


def _eval_curves(base: str) -> Callable[[Axes, RunFiles, str], None]:
    def draw(ax: Axes, run: RunFiles, prefix: str) -> None:
        for key in _keys(run, base):
            xs, ys = run.series(key, rows=run.eval_rows())
            main = key == base
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=2 if main else 1, label=f"{prefix}{key}")

    return draw


def _simple(key: str) -> Callable[[Axes, RunFiles, str], None]:
    def draw(ax: Axes, run: RunFiles, prefix: str) -> None:
        xs, ys = run.series(key)
        ax.plot(xs, ys, label=f"{prefix}{key}")

    return draw


def _has(key: str) -> Callable[[RunFiles], bool]:
    return lambda run: bool(run.series(key)[0])


def _grad_norm(ax: Axes, run: RunFiles, prefix: str) -> None:
    xs, ys = run.series("grad_norm")
    (line,) = ax.plot(xs, ys, label=f"{prefix}grad_norm (before clipping)")
    clip = run.setting("train.max_grad_norm")
    if _finite(clip) and clip > 0:  # 0 disables clipping: no threshold to draw
        ax.axhline(
            clip, linestyle="--", color=line.get_color(), linewidth=1, label=f"{prefix}max_grad_norm {clip:g}"
        )


def _memory(ax: Axes, run: RunFiles, prefix: str) -> None:
    rows = [r for r in run.train_rows() if isinstance(r.get("peak_memory_mib_per_rank"), list)]
    ranks = max((len(r["peak_memory_mib_per_rank"]) for r in rows), default=0)
    for rank in range(ranks):
        pairs = [
            (r["step"], r["peak_memory_mib_per_rank"][rank])
            for r in rows
            if rank < len(r["peak_memory_mib_per_rank"]) and _finite(r["peak_memory_mib_per_rank"][rank])
        ]
        ax.plot([p[0] for p in pairs], [p[1] for p in pairs], label=f"{prefix}rank {rank}")


def _has_memory(run: RunFiles) -> bool:
    return any(isinstance(r.get("peak_memory_mib_per_rank"), list) for r in run.train_rows())


PLOTS = [
    Plot("loss.png", "train rows", _has("loss"), _train_loss("step"), "train loss", ylabel="loss"),
    Plot(
        "loss_tokens.png",
        "train rows",
        _has("loss"),
        _train_loss("tokens"),
        "train loss by tokens",
        xlabel="tokens",
        ylabel="loss",
    ),
    Plot(
        "eval_loss.png",
        "eval rows",
        lambda r: bool(_keys(r, "eval_loss")),
        _eval_curves("eval_loss"),
        "eval loss",
        ylabel="loss",
    ),
    Plot(
        "exact_match.png",
        "exact_match rows",
        lambda r: bool(_keys(r, "eval_exact_match")),
        _eval_curves("eval_exact_match"),
        "eval exact match",
        ylabel="exact match",
        optional=True,
    ),
    Plot("lr.png", "lr values", _has("lr"), _simple("lr"), "learning rate", ylabel="lr"),
    Plot("grad_norm.png", "grad_norm values", _has("grad_norm"), _grad_norm, "gradient norm", ylabel="norm"),
    Plot(
        "tokens_per_sec.png",
        "tokens_per_sec values",
        _has("tokens_per_sec"),
        _simple("tokens_per_sec"),
        "throughput",
        ylabel="tokens/s (all ranks)",
    ),
    Plot("mfu.png", "mfu values", _has("mfu"), _simple("mfu"), "model FLOPs utilisation", optional=True),
    Plot("memory.png", "peak memory rows", _has_memory, _memory, "peak memory per rank", ylabel="MiB"),
]


def _where(run: RunFiles) -> str:
    return str(run.path)


def draw(
    run_dirs: Sequence[str | os.PathLike | RunFiles],
    out_dir: str | os.PathLike | None = None,
    say: Say = print,
) -> Counts:
    """Draw every plot the runs have data for into out_dir (default: the first run's plots/), saying one
    line per plot skipped or run left out. Returns {png: {curve label: points}} for the PNGs written."""
    runs = [r if isinstance(r, RunFiles) else read_run(r) for r in run_dirs]
    matplotlib_figure()  # refuse before anything else when matplotlib is missing
    out = Path(out_dir) if out_dir is not None else runs[0].path / PLOTS_DIR
    for run in runs:
        if not run.has_metrics:
            say(f"dtrain: plot: no metrics.jsonl in {_where(run)}; nothing to draw from it")
        elif run.torn:
            say(
                f"dtrain: plot: {run.torn} unreadable line(s) in {_where(run)}/metrics.jsonl skipped (a run "
                "killed mid-write)"
            )
    written: Counts = {}
    several = len(runs) > 1
    for plot in PLOTS:
        having = [r for r in runs if r.has_metrics and plot.has(r)]
        for run in runs:
            if run not in having and run.has_metrics and having and not plot.optional:
                say(f"dtrain: plot: no {plot.what} in {_where(run)}; left out of {plot.png}")
        if not having:
            if not plot.optional and any(r.has_metrics for r in runs):
                where = ", ".join(_where(r) for r in runs if r.has_metrics)
                say(f"dtrain: plot: no {plot.what} in {where}; {plot.png} skipped")
            (out / plot.png).unlink(missing_ok=True)  # an earlier draw's would be stale beside the others
            continue
        fig, ax = _axes(plot.title, plot.xlabel, plot.ylabel)
        for run in having:
            plot.draw(ax, run, f"{run.name} " if several else "")
        _finish(ax)
        written[plot.png] = save(fig, out / plot.png)
    return written


# --------------------------------------------------------------------------------------------
# Hooks for train.py: never fail a run
# --------------------------------------------------------------------------------------------

_said_off = False


def safely(out_dir: str | os.PathLike, say: Say, quiet: bool) -> Counts:
    """draw() for a live run: matplotlib missing is said once per process, any other failure becomes one
    warning line, and (quiet) the plots skipped for lack of rows so far are not said."""
    global _said_off
    try:
        return draw([out_dir], say=(lambda _line: None) if quiet else say)
    except PlotsUnavailable:
        if not _said_off:
            say(f"dtrain: {PLOTS_OFF}")
            _said_off = True
    except Exception as exc:  # a plot must never cost a run
        reason = " ".join(str(exc).split())[:200]
        say(f"dtrain: warning: plots not drawn ({type(exc).__name__}: {reason})")
    return {}


def at_eval(out_dir: str | os.PathLike, say: Say) -> Counts:
    """After each periodic eval (main process, --log.plots): redraw, quietly."""
    return safely(out_dir, say, quiet=True)


# --------------------------------------------------------------------------------------------
# dtrain plot
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dtrain plot",
        description="Draw runs' curves to PNGs (loss, eval, lr, gradient norm, throughput, memory); one run "
        "also gets summary.md. Several runs are overlaid.",
        allow_abbrev=False,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's --output_dir")
    parser.add_argument(
        "--out", default=None, help="directory for the PNGs (default: the first RUN_DIR's plots/)"
    )
    return parser


def plot_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    matplotlib_figure()  # the one-line refusal, before any file is read
    runs = [read_run(p) for p in args.run_dirs]
    written = draw(runs, args.out)
    out = Path(args.out) if args.out else runs[0].path / PLOTS_DIR
    print(f"dtrain: plot: {len(written)} PNG(s) in {out}", flush=True)
    if len(runs) == 1:
        from dtrain.summary import write_summary

        print(f"dtrain: plot: wrote {write_summary(runs[0].path, out)}", flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# dtrain plot-lr
# --------------------------------------------------------------------------------------------

LR_FLAGS = ("--steps", "--out")


def split_plot_lr_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """plot-lr's own flags (--steps, --out, --help) split off; the rest are training flags."""
    parser = build_lr_parser()
    own, rest, i = [], [], 0
    while i < len(argv):
        word = argv[i]
        if word in ("-h", "--help"):
            own.append(word)
        elif word == "--":  # training flags after it, as for `dtrain launch`
            pass
        elif word in LR_FLAGS:  # its value follows (argparse names a missing one)
            own += argv[i : i + 2]
            i += 1
        elif word.split("=", 1)[0] in LR_FLAGS:
            own.append(word)
        else:
            rest.append(word)
        i += 1
    return parser.parse_args(own), rest


def build_lr_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dtrain plot-lr",
        description="Draw a recipe's learning rate per optimizer step, as the run's own scheduler produces "
        "it. Every other flag is a training flag (--config R.yaml --optim.scheduler wsd ...).",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps to draw (default: train.max_steps)"
    )
    parser.add_argument(
        "--out", default="lr_schedule.png", help="the PNG to write (default: lr_schedule.png here)"
    )
    return parser


@dataclass
class LrCurve:
    lrs: list[float]  # at steps 1..N, as the run logs them (read before the schedule moves)
    head_lrs: list[float] | None
    warmup: int
    stable: int | None  # wsd only
    decay: int | None
    restarts: list[int]  # cosine_with_restarts: the steps where the lr jumps back up


def lr_steps(steps: int | None, max_steps: int | None) -> int:
    """The steps to draw: --steps, else train.max_steps; an epoch-counted recipe needs --steps (its step
    count depends on the data, which plot-lr does not load)."""
    if steps is None and max_steps is None:
        raise UserError(
            "--steps is required: the recipe counts epochs (train.max_steps is null), so give the optimizer "
            "steps to draw, e.g. --steps 1000"
        )
    n = steps if steps is not None else max_steps
    assert n is not None
    if n < 1:
        raise UserError(f"--steps must be >= 1 (got {n})")
    return n


def lr_curve(optim, steps: int) -> LrCurve:
    """Step the run's own scheduler (dtrain.optim.build_scheduler) over a dummy optimizer `steps` times."""
    import torch

    from dtrain.optim import build_scheduler

    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    groups: list[dict] = [{"params": [params[0]], "lr": optim.lr}]
    if optim.head_lr is not None:
        groups.append({"params": [params[1]], "lr": optim.head_lr})
    opt = torch.optim.SGD(groups, lr=optim.lr)
    sched = build_scheduler(opt, optim, steps)
    lrs, heads = [], []
    for _ in range(steps):
        lrs.append(float(opt.param_groups[0]["lr"]))
        heads.append(float(opt.param_groups[-1]["lr"]))
        opt.step()
        sched.step()
    shape = sched.lr_lambdas[0].keywords  # the phase lengths build_scheduler chose, not recomputed here
    restarts = []
    if optim.scheduler == "cosine_with_restarts":
        restarts = [s + 1 for s in range(shape["warmup"] + 1, steps) if lrs[s] > lrs[s - 1]]
    wsd = optim.scheduler == "wsd"
    return LrCurve(
        lrs,
        heads if optim.head_lr is not None else None,
        shape["warmup"],
        shape["stable"] if wsd else None,
        shape["decay"] if wsd else None,
        restarts,
    )


def draw_lr(curve: LrCurve, scheduler: str, out: Path) -> dict[str, int]:
    """The curve, with warmup shaded (wsd: stable and decay too) and restarts as vertical lines."""
    fig, ax = _axes(f"learning rate: {scheduler}", "step", "lr")
    steps = list(range(1, len(curve.lrs) + 1))
    ax.plot(steps, curve.lrs, label="lr")
    if curve.head_lrs is not None:
        ax.plot(steps, curve.head_lrs, label="head_lr")
    spans = [("warmup", 0, curve.warmup, "tab:orange")]
    if curve.stable is not None and curve.decay is not None:
        spans += [
            ("stable", curve.warmup, curve.warmup + curve.stable, "tab:green"),
            ("decay", curve.warmup + curve.stable, len(steps), "tab:purple"),
        ]
    for label, start, end, color in spans:
        if end > start:  # steps start+1..end, drawn from the half-step before to the half-step after
            ax.axvspan(start + 0.5, end + 0.5, alpha=0.15, color=color, label=label)
    for i, s in enumerate(curve.restarts):
        ax.axvline(s, linestyle="--", color="tab:gray", label="restart" if i == 0 else "_nolegend_")
    _finish(ax)
    return save(fig, out)


def plot_lr_main(argv: list[str] | None = None) -> int:
    from dtrain.config import parse_config

    args, flags = split_plot_lr_args(list(argv or []))
    matplotlib_figure()
    cfg = parse_config(flags)
    steps = lr_steps(args.steps, cfg.train.max_steps)
    curve = lr_curve(cfg.optim, steps)
    draw_lr(curve, cfg.optim.scheduler, Path(args.out))
    print(
        f"dtrain: plot-lr: {cfg.optim.scheduler} over {steps} steps, peak {max(curve.lrs):.4g}, warmup "
        f"{curve.warmup} -> {args.out}",
        flush=True,
    )
    return 0

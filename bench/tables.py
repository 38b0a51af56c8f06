"""The benchmark's tables (bench/run.py): one rich table per section, then its notes and its goals, on
the console."""

from __future__ import annotations

import statistics

from runner import Case, med, rank_peaks, ratio, spread

HEAVY_MODULES = (
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "deepspeed",
    "bitsandbytes",
    "torchao",
    "tensorboard",
    "wandb",
    "jsonargparse",
    "yaml",
)


def make_console():
    """A rich console; off a terminal (CI logs, files) wide enough that no table wraps."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # CI logs and files: wide enough that no table wraps
        console = Console(width=200)
    return console


def fmt(x, spec: str = ".0f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def status_text(c: Case) -> str:
    if c.status == "failed":
        return f"FAILED: {c.error[:160]}"
    if c.status == "ok":
        return c.note
    return f"{c.status}: {c.note}" if c.note else c.status


def _speed(t, sec: dict) -> None:
    """overhead, throughput, gpu: tokens/s, step time, padding, peak RSS (+ MFU on a GPU)."""
    kind = sec["kind"]
    cases: list[Case] = sec["cases"]
    by = {c.key: c for c in cases}
    bases = sec.get("bases", {})  # a case's own Trainer (GPT-2's), else Trainer + DataCollatorForSeq2Seq
    cols = ["case", "real tokens/s", "±", "step s", "tokens/step", "padding", "peak RSS MiB"]
    if kind == "section_throughput":
        cols.insert(3, "vs Trainer")
    if kind == "section_gpu":
        cols += ["MFU", "MFU logged", "peak GPU MiB"]
    for col in [*cols, "note"]:
        t.add_column(col, justify="left" if col in ("case", "note") else "right")
    for c in cases:
        s = c.summary()
        row = [
            c.label,
            fmt(s.get("tokens_per_sec")),
            fmt(s.get("tokens_per_sec_spread"), ".0%"),
            fmt(s.get("step_time_s"), ".4f"),
            fmt(s.get("tokens_per_step")),
            fmt(s.get("padding_fraction"), ".0%"),
            fmt(s.get("peak_rss_mib")),
        ]
        if kind == "section_throughput":
            base = by.get(bases.get(c.key, "trainer_dynamic"))
            r = ratio(c, base, "tokens_per_sec") if base else None
            row.insert(3, fmt(r, ".2f", "x"))
        if kind == "section_gpu":
            row += [
                fmt(s.get("mfu"), ".1%"),
                fmt(s.get("mfu_logged"), ".1%"),
                fmt(s.get("peak_memory_mib_logged")),
            ]
        t.add_row(*row, status_text(c))


def _optim_state(t, sec: dict) -> None:
    """3(i): optimizer-state bytes per parameter and dtypes."""
    cases: list[Case] = sec["cases"]
    for col in ("optimizer", "state bytes/param", "state dtypes", "note"):
        t.add_column(col)
    for c in cases:
        r = c.repeats[-1] if c.repeats else {}
        t.add_row(
            c.label,
            fmt(r.get("optim_state_bytes_per_param"), ".2f"),
            r.get("optim_state_dtypes") or "-",
            status_text(c),
        )


def _profiles(t, sec: dict) -> None:
    """3(ii): per-rank bytes per parameter against the ZeRO formula."""
    cases: list[Case] = sec["cases"]
    cols = [
        "profile",
        "params B/p",
        "grads B/p",
        "state B/p",
        "total MiB/rank",
        "formula MiB",
        "measured/formula",
        "+ master MiB",
        "+ buckets MiB",
        "peak RSS MiB",
        "note",
    ]
    for col in cols:
        t.add_column(col, justify="left" if col in ("profile", "note") else "right")
    for c in cases:
        r = c.repeats[-1] if c.repeats else {}
        mib = 2**20
        t.add_row(
            c.label,
            fmt(r.get("params_per_param"), ".2f"),
            fmt(r.get("grads_per_param"), ".2f"),
            fmt(r.get("state_per_param"), ".2f"),
            fmt(r.get("measured_bytes", 0) / mib if r else None, ".1f"),
            fmt(r.get("formula_bytes", 0) / mib if r else None, ".1f"),
            fmt(r.get("ratio"), ".3f"),
            fmt(r.get("master_bytes", 0) / mib if r else None, ".1f"),
            fmt(r.get("buffer_bytes", 0) / mib if r else None, ".1f"),
            fmt(r.get("peak_rss_mib")),
            status_text(c),
        )


def _loss_memory(t, sec: dict) -> None:
    """3(iii): peak memory with and without the chunked loss."""
    cases: list[Case] = sec["cases"]
    for col in ("case", "peak RSS MiB", "peak_memory_mib (logged)", "real tokens/s", "note"):
        t.add_column(col, justify="left" if col in ("case", "note") else "right")
    for c in cases:
        s = c.summary()
        t.add_row(
            c.label,
            fmt(s.get("peak_rss_mib")),
            fmt(s.get("peak_memory_mib_logged")),
            fmt(s.get("tokens_per_sec")),
            status_text(c),
        )


def _startup(t, sec: dict) -> None:
    """4: seconds to the first step and of --print_config."""
    cases: list[Case] = sec["cases"]
    for col in ("what", "seconds (median)", "±", "peak RSS MiB", "note"):
        t.add_column(col, justify="left" if col in ("what", "note") else "right")
    for c in cases:
        s = c.summary(keys=("seconds",))
        t.add_row(
            c.label,
            fmt(s.get("seconds"), ".2f"),
            fmt(s.get("seconds_spread"), ".0%"),
            fmt(s.get("peak_rss_mib")),
            status_text(c),
        )


def _data_prepare(t, sec: dict) -> None:
    """5(i): dtrain prepare against the run_clm recipe."""
    cases: list[Case] = sec["cases"]
    cols = [
        "case",
        "corpus",
        "documents",
        "text tokens",
        "seconds",
        "±",
        "tokens/s",
        "in-process s",
        "tokens written",
        "peak RSS MiB",
        "disk B/token",
        "note",
    ]
    for col in cols:
        t.add_column(col, justify="left" if col in ("case", "corpus", "note") else "right")
    for c in cases:
        r = c.repeats[0] if c.repeats else {}
        t.add_row(
            c.label,
            r.get("corpus", "-"),
            fmt(r.get("documents"), ","),
            fmt(r.get("corpus_text_tokens"), ","),
            fmt(med(c, "wall_s"), ".2f"),
            fmt(spread(c, "wall_s"), ".0%"),
            fmt(med(c, "tokens_per_sec"), ",.0f"),
            fmt(med(c, "in_process_s"), ".2f"),
            fmt(r.get("tokens") or r.get("block_tokens"), ","),
            fmt(med(c, "peak_rss_mib")),
            fmt(r.get("disk_bytes_per_token"), ".2f"),
            status_text(c),
        )


def _data_startup(t, sec: dict) -> None:
    """5(ii): start-up and per-rank peak RSS on prepared corpora."""
    cases: list[Case] = sec["cases"]
    for col in (
        "case",
        "documents",
        "tokens",
        "packed rows",
        "start-up s",
        "±",
        "RSS MiB/rank to step 1",
        "whole run: lowest",
        "median",
        "file-backed MiB",
        "wall s",
        "note",
    ):
        t.add_column(col, justify="left" if col in ("case", "note") else "right")
    for c in cases:
        r = c.repeats[0] if c.repeats else {}
        per = lambda d: " / ".join(f"{v:.0f}" for v in d.values()) or "-"  # noqa: E731
        t.add_row(
            c.label,
            fmt(r.get("documents"), ","),
            fmt(r.get("tokens"), ","),
            fmt(r.get("rows"), ","),
            fmt(med(c, "startup_s"), ".2f"),
            fmt(spread(c, "startup_s"), ".0%"),
            per(rank_peaks(c, statistics.median, "rank_first_step_rss_mib")),
            per(rank_peaks(c)),
            per(rank_peaks(c, statistics.median)),
            per(rank_peaks(c, max, "rank_rss_file_mib")),
            fmt(med(c, "wall_s"), ".1f"),
            status_text(c),
        )


def _data_large(t, sec: dict) -> None:
    """5(iii): the 100M-token corpus, step by step."""
    cases: list[Case] = sec["cases"]
    for col in (
        "step",
        "documents",
        "tokens",
        "seconds",
        "tokens/s",
        "disk B/token",
        "start-up s",
        "peak RSS MiB (per rank: to step 1; whole run)",
        "note",
    ):
        t.add_column(col, justify="left" if col in ("step", "note") else "right")
    for c in cases:
        r = c.repeats[0] if c.repeats else {}
        peaks = fmt(r.get("peak_rss_mib"))
        if "rank_peak_rss_mib" in r:  # training: to step 1, then the whole run, per rank
            step1, whole = (
                " / ".join(f"{v:.0f}" for v in r[k].values())
                for k in ("rank_first_step_rss_mib", "rank_peak_rss_mib")
            )
            peaks = f"{step1}; whole run {whole}"
        seconds = r.get("seconds") if c.key == "generate" else r.get("wall_s")
        t.add_row(
            c.label,
            fmt(r.get("documents"), ","),
            fmt(r.get("tokens"), ","),
            fmt(seconds, ".1f"),
            fmt(r.get("tokens_per_sec"), ",.0f"),
            fmt(r.get("disk_bytes_per_token"), ".2f"),
            fmt(r.get("startup_s"), ".2f"),
            peaks,
            status_text(c),
        )


def _checkpoint(t, sec: dict) -> None:
    """6: per save, the training thread's blocked time and the time to the commit."""
    for col in (
        "case",
        "saves",
        "blocked s",
        "committed s",
        "step after a save s",
        "other steps s",
        "stop s",
        "peak RSS MiB",
        "note",
    ):
        t.add_column(col, justify="left" if col in ("case", "note") else "right")
    for c in sec["cases"]:
        r = c.repeats[-1] if c.repeats else {}
        t.add_row(
            c.label,
            fmt(r.get("saves")),
            fmt(r.get("blocked_s"), ".3f"),
            fmt(r.get("committed_s"), ".2f"),
            fmt(r.get("step_after_save_s"), ".3f"),
            fmt(r.get("others_s"), ".3f"),
            fmt(r.get("stop_s"), ".2f"),
            fmt(r.get("peak_rss_mib")),
            status_text(c),
        )


FILL = {
    "section_checkpoint": _checkpoint,
    "section_overhead": _speed,
    "section_throughput": _speed,
    "section_gpu": _speed,
    "section_optim_state": _optim_state,
    "section_profiles": _profiles,
    "section_loss_memory": _loss_memory,
    "section_startup": _startup,
    "section_data_prepare": _data_prepare,
    "section_data_startup": _data_startup,
    "section_data_large": _data_large,
}


def print_section(console, sec: dict) -> None:
    from rich.table import Table

    kind = sec["kind"]
    t = Table(title=sec["title"], title_justify="left", show_lines=False)
    if kind in FILL:
        FILL[kind](t, sec)
    console.print(t)
    if kind == "section_gpu":
        c = Table(title="GPU: adamw_8bit short runs", title_justify="left")
        for col in ("run", "first loss", "last loss", "finite", "falling", "note"):
            c.add_column(col)
        for case in sec["checks"]:
            r = case.repeats[-1] if case.repeats else {}
            c.add_row(
                case.label,
                fmt(r.get("loss_first"), ".3f"),
                fmt(r.get("loss_last"), ".3f"),
                str(r.get("finite", "-")),
                str(r.get("falling", "-")),
                status_text(case),
            )
        console.print(c)
    if kind == "section_startup":
        imp = Table(
            title="4. Heavy modules imported (cumulative import seconds, and the outermost import that pulled each in; '-' = not imported)",
            title_justify="left",
        )
        imp.add_column("module")
        for what in sec["imports"]:
            imp.add_column(what, justify="right")
        for mod in HEAVY_MODULES:
            cells = []
            for w in sec["imports"]:
                hit = sec["imports"][w].get(mod)
                cells.append(
                    "-"
                    if not isinstance(hit, dict)
                    else f"{hit['seconds']:.2f}" + (f" (via {hit['via']})" if hit["via"] else "")
                )
            imp.add_row(mod, *cells)
        console.print(imp)
    for note in sec.get("notes", []):
        console.print(f"  [dim]{note}[/dim]", highlight=False)
    if sec["goals"]:
        g = Table(title_justify="left", show_header=True)
        for col in ("goal", "value", "target", "met"):
            g.add_column(col)
        for x in sec["goals"]:
            v = x["value"]
            value = (
                "-"
                if v is None
                else (f"{v:.1%}" if "%" in x["target"] and "within" not in x["target"] else f"{v:.3f}")
            )
            met = {True: "yes", False: "NO", None: "not judged"}[x["met"]]
            g.add_row(x["goal"], value, x["target"], met)
        console.print(g)

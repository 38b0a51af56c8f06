"""The plan as a table with its footnote (every formula used), or as the same content in JSON."""

from __future__ import annotations

from dtrain.plan.memory import FORMULAS, PARTS

GiB = 2**30
HEADERS = (
    "profile",
    "micro x accum",
    "weights",
    "grads",
    "optim",
    "activ",
    "logits",
    "buffers",
    "fixed",
    "total",
    "fits",
)


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}" if x < 10 * GiB else f"{x / GiB:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.2f}M" if n >= 1e5 else f"{n:,}"


def _savers(s) -> str:
    parts = (["ckpt"] if s.checkpointing else []) + ([f"chunk {s.loss_chunk}"] if s.loss_chunk else [])
    return f" ({', '.join(parts)})" if parts else ""


def _cells(row) -> list[str]:
    name = row.candidate.name + (f" + {row.optimizer_note}" if row.optimizer_note else "")
    if row.candidate.refused:
        return [name, "refused"] + [""] * (len(HEADERS) - 2)  # why: under the table (_refusals)
    e = row.estimate
    s = e.setting
    fits = {True: "yes", False: "no", None: "?"}[row.fits]
    return [
        name,
        f"{s.micro_batch} x {s.accumulation}{_savers(s)}",
        *(_gib(getattr(e, p)) for p in PARTS),
        _gib(e.total),
        fits,
    ]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows if r[1] != "refused" or i == 0) for i in range(len(HEADERS))]
    lines = []
    for r in rows:
        if r[1] == "refused":
            lines.append(f"{r[0]:<{widths[0]}}  {r[1]}")
        else:
            lines.append(
                "  ".join(
                    c.ljust(w) if i < 2 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(r, widths, strict=True))
                )
            )
    return lines


def _refusals(rows) -> list[str]:
    """Each reason a profile was refused, once, with the profiles it refused."""
    by_reason: dict[str, list[str]] = {}
    for r in rows:
        if r.candidate.refused:
            by_reason.setdefault(r.candidate.refused, []).append(r.candidate.name)
    return [f"refused ({', '.join(names)}): {why}" for why, names in by_reason.items()]


def as_text(plan) -> str:
    shape, cfg, device = plan.shape, plan.cfg, plan.device
    t = cfg.train
    global_batch = t.per_device_batch_size * t.gradient_accumulation_steps * plan.gpus * plan.nodes
    head = [
        f"dtrain plan: {shape.architecture}, {_count(shape.params)} parameters ({_count(shape.trainable)} trained), "
        f"{plan.gpus} GPU(s) x {plan.nodes} node(s) of {device.bytes / GiB:.1f} GiB ({device.name}, {device.how}); "
        f"{cfg.optim.name}, precision {cfg.train.mixed_precision or 'from the profile'}, max_length {cfg.data.max_length}, "
        f"global batch {global_batch} kept",
        "memory per GPU, GiB:",
    ]
    rows = [list(HEADERS)] + [_cells(r) for r in plan.rows]
    lines = head + _table(rows) + _refusals(plan.rows)
    if plan.extra_rows:
        lines += [
            "",
            "with an 8-bit optimizer instead (another optimizer changes the training: shown, never recommended):",
        ]
        lines += _table([list(HEADERS)] + [_cells(r) for r in plan.extra_rows])[1:]
        lines += _refusals(plan.extra_rows)
    lines.append("")
    if plan.choice:
        said = f" ({' and '.join(plan.choice.savers)} needed to fit)" if plan.choice.savers else ""
        e = plan.choice.estimate
        lines += [
            f"recommended: {e.setting.profile}, micro-batch {e.setting.micro_batch} x {e.setting.accumulation} accumulation, "
            f"{e.total / GiB:.1f} of {device.bytes / GiB:.1f} GiB{said}:",
            f"  {plan.command}",
        ]
        if plan.staging is not None:
            lines.append(
                f"  --checkpoint.async_save: {plan.staging / GiB:.1f} GiB more host (CPU) memory per process, the "
                "snapshot of its weights and optimizer state"
            )
    else:
        lines.append(f"nothing fits: {plan.advice}")
    lines += ["", "how: activations " + plan.activations.plain.how] + [f"  {f}" for f in FORMULAS]
    return "\n".join(lines)


def as_json(plan) -> dict:
    shape, device = plan.shape, plan.device

    def row(r) -> dict:
        base = {"profile": r.candidate.name, "optimizer": r.candidate.setting.optimizer}
        if r.candidate.refused:
            return {**base, "refused": r.candidate.refused}
        return {**base, **r.estimate.to_dict(), "fits": r.fits}

    return {
        "model": {
            "architecture": shape.architecture,
            "parameters": shape.params,
            "trained_parameters": shape.trainable,
            "layers": shape.layers,
            "hidden_size": shape.hidden,
            "vocab_size": shape.vocab,
            "weight_bytes": round(shape.weight_bytes),
        },
        "device": {"bytes": device.bytes, "name": device.name, "how": device.how},
        "gpus": plan.gpus,
        "nodes": plan.nodes,
        "rows": [row(r) for r in plan.rows],
        "eight_bit_rows": [row(r) for r in plan.extra_rows],
        "recommended": (
            {**plan.choice.estimate.to_dict(), "savers": plan.choice.savers, "command": plan.command}
            if plan.choice
            else None
        ),
        "advice": plan.advice,
        "async_staging_bytes": None if plan.staging is None else round(plan.staging),
        "activations": plan.activations.plain.how,
        "formulas": FORMULAS,
    }

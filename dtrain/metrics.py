"""Where numbers go: metrics.jsonl (always), Accelerate trackers, the progress bar, samples.jsonl.

Device-side accumulators are summed across ranks and copied to the host only at logging
steps, so the training step itself never waits on the host.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch


class StepStats:
    """Running sums since the last log: target-token loss sum, target tokens and real input tokens
    on the device (no sync per step); padded positions (a shape, known on the host) on the host."""

    FIELDS = ("loss_sum", "targets", "tokens")

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)
        self.positions = 0

    def add(
        self, loss_sum: torch.Tensor, targets: torch.Tensor, tokens: torch.Tensor, positions: int
    ) -> None:
        self.sums += torch.stack([loss_sum.double(), targets.double(), tokens.double()])
        self.positions += positions

    def reset(self) -> None:
        self.sums.zero_()
        self.positions = 0

    def pop(self, accelerator) -> dict:
        """Gather every rank's sums and peak memory and copy them to the host (the one sync per log
        interval), then reset. Returns the sums over ranks and `peak_memory` (bytes, one per rank)."""
        host = torch.tensor(
            [float(self.positions), float(peak_memory_bytes(self.sums.device))],
            dtype=torch.float64,
            device=self.sums.device,
        )
        per_rank = accelerator.gather(torch.cat([self.sums, host])).view(accelerator.num_processes, -1)
        totals = per_rank[:, :-1].sum(0).tolist()
        peaks = per_rank[:, -1].tolist()
        self.reset()
        return {**dict(zip((*self.FIELDS, "positions"), totals, strict=True)), "peak_memory": peaks}


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory: CUDA, the most the caching allocator ever handed out
    (`max_memory_allocated`); CPU, the peak resident set size of the process (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Dense bf16 tensor-core peak FLOP/s by device name (vendor data sheets, without sparsity). Checked in
# order, first match wins; a device not listed gets no MFU rather than a wrong one.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (the name reads "H100 80GB HBM3")
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def mfu(tokens_per_sec_per_device: float, flops_per_token: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation: the model's training FLOPs at this throughput over the device's peak."""
    if not flops_per_token or not peak:
        return None
    return tokens_per_sec_per_device * flops_per_token / peak


class MetricsLogger:
    def __init__(
        self,
        accelerator,
        output_dir: Path,
        total_steps: int,
        start_step: int,
        progress_bar: bool,
        flops_per_token: float | None = None,
    ):
        self.accelerator = accelerator
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops(accelerator.device)
        self.main = accelerator.is_main_process
        self.path = output_dir / "metrics.jsonl"
        self.last_time = time.perf_counter()
        self.bar = None
        self.shown: dict = {}
        if self.main and progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def truncate_after(self, step: int, keep_faults: bool = False) -> None:
        """On resume: drop rows logged after the checkpoint; the resumed run logs them again. A rollback
        keeps the rows recording the fault (`nonfinite`): the window is stepped over, so never logged again."""
        if not self.main or not self.path.exists():
            return
        rows = [
            line
            for line in self.path.read_text().splitlines()
            if _step_of(line) <= step or (keep_faults and '"nonfinite": true' in line)
        ]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        tmp.replace(self.path)

    def rewind(self, step: int) -> None:
        """After a rollback to `step`: the rows after it will be logged again."""
        self.truncate_after(step, keep_faults=True)
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()
        self.restart_clock()

    def train_row(
        self,
        step: int,
        sums: dict,  # StepStats.pop: the float sums and `peak_memory`, a list
        lr: float | None,
        grad_norm: float | None,
        epoch: float,
        tokens_seen: int,
    ) -> dict:
        now = time.perf_counter()
        elapsed, self.last_time = now - self.last_time, now
        loss = sums["loss_sum"] / sums["targets"] if sums["targets"] else None  # nothing trained: no loss
        tokens_per_sec = sums["tokens"] / elapsed if elapsed > 0 else None
        per_device = (tokens_per_sec or 0.0) / self.accelerator.num_processes
        mib = [round(b / 2**20, 1) for b in sums["peak_memory"]]
        return {
            "step": step,
            "loss": loss,
            "ppl": math.exp(min(loss, 50.0)) if loss is not None else None,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens_seen,
            "tokens_per_sec": tokens_per_sec,
            "padding_fraction": 1.0 - sums["tokens"] / max(sums["positions"], 1.0),
            "mfu": mfu(per_device, self.flops_per_token, self.peak_flops),
            "peak_memory_mib": max(mib),
            "peak_memory_mib_per_rank": mib,
            "epoch": epoch,
        }

    def restart_clock(self) -> None:
        """Eval and checkpoint time must not count against training throughput."""
        self.last_time = time.perf_counter()

    def log(self, row: dict) -> None:
        if self.main:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            if self.bar is not None:  # the latest of each (an eval row keeps the last train loss shown)
                self.shown.update(
                    {
                        k: f"{row[k]:.3g}" if isinstance(row[k], float) else row[k]
                        for k in ("loss", "lr", "tokens_per_sec", "eval_loss", "eval_exact_match")
                        if row.get(k) is not None
                    }
                )
                self.bar.set_postfix(self.shown, refresh=False)
        self.accelerator.log(
            {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=row["step"]
        )

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, message: str) -> None:
        if self.main:
            if self.bar is not None:
                self.bar.write(message)
            else:
                print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _step_of(line: str) -> float:
    """A row's step; a line torn by a kill (or blank) sorts after every checkpoint, so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")

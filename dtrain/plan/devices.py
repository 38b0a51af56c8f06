"""How much memory a GPU has: named (`--gpu H100`), given (`--gpu-memory 80GiB`), or read through NVML.

NVML (`pynvml`, else `nvidia-smi`) reads the driver's numbers without creating a CUDA context, so the
launcher process stays light and holds no GPU memory of its own.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from dtrain.config import UserError

MiB, GiB = 2**20, 2**30

# Total memory as the driver reports it (nvidia-smi's memory.total, MiB), by the names people use.
GPUS = {
    "H100": 81559 * MiB,
    "H200": 143771 * MiB,
    "B200": 183359 * MiB,
    "A100": 81920 * MiB,
    "A100-40GB": 40960 * MiB,
    "L40S": 46068 * MiB,
    "L4": 23034 * MiB,
    "A10G": 23028 * MiB,
    "RTX4090": 24564 * MiB,
    "V100": 32768 * MiB,
    "V100-16GB": 16384 * MiB,
    "MI300X": 192 * GiB,
}


def named(name: str) -> int:
    key = name.upper().replace(" ", "").replace("_", "-")
    for gpu, size in GPUS.items():
        if key == gpu.upper():
            return size
    raise UserError(f"--gpu: unknown GPU '{name}'; choose one of {', '.join(GPUS)} or give --gpu-memory SIZE")


def parse_size(text: str) -> int:
    """'80GiB', '80GB' (10^9), '81559MiB', '80' (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise UserError(f"--gpu-memory: '{text}' is not a size; write it like 80GiB, 80GB or 81559MiB")
    value, unit = float(m.group(1)), (m.group(2) or "GiB").upper()
    power = "KMGT".index(unit[0]) + 1
    base = 1024 if "I" in unit else 1000
    if unit in ("K", "M", "G", "T"):
        base = 1024
    return int(value * base**power)


def visible_memory() -> tuple[int, str] | None:
    """(smallest total memory over the visible GPUs, the GPU's name) through NVML; None without a GPU."""
    found = _pynvml() or _nvidia_smi()
    if not found:
        return None
    return min(found)


def _pynvml() -> list[tuple[int, str]]:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
        try:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            return [
                (int(pynvml.nvmlDeviceGetMemoryInfo(h).total), str(pynvml.nvmlDeviceGetName(h)))
                for h in handles
            ]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver: no GPU to plan for
        return []


def _nvidia_smi() -> list[tuple[int, str]]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total,name", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.strip().splitlines():
        size, _, name = line.partition(",")
        if size.strip().isdigit():
            found.append((int(size) * MiB, name.strip()))
    return found

"""What this machine has (CPU RAM, each CUDA device's free memory, free disk at the output) and whether a StagePlan
fits it; when not, the option that would make it fit. The plan only warns: estimates can be wrong, so nothing here
refuses a run."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from spp_cli.memory_plan.estimate import RUNTIME_BYTES, GiB, MiB, StagePlan


@dataclass(frozen=True)
class Devices:
    """Free bytes now: CPU RAM (available), each CUDA device, and the disk holding the output (None: unknown)."""

    cpu_ram: int | None
    accelerators: dict[str, int] = field(default_factory=dict)
    disk: int | None = None


def available_ram() -> int | None:
    """MemAvailable (psutil when installed, else /proc/meminfo), bytes."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_disk(out: str | Path | None) -> int | None:
    """Free bytes on the filesystem that will hold `out` (its nearest existing folder)."""
    if out is None:
        return None
    folder = Path(out).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def free_accelerators(device: str) -> dict[str, int]:
    """{device: free bytes} of the CUDA device a stage computes on (torch imported only for a CUDA device)."""
    if not device.startswith("cuda"):
        return {}
    import torch

    if not torch.cuda.is_available():
        return {}
    index = int(device.split(":")[1]) if ":" in device else 0
    return {device: int(torch.cuda.mem_get_info(index)[0])}


def detect_devices(device: str = "cpu", out: str | Path | None = None) -> Devices:
    return Devices(available_ram(), free_accelerators(device), free_disk(out))


def size_text(count: int | None) -> str:
    """Bytes for people: "1.2 GiB", "350 MiB", "-" for nothing."""
    if count is None:
        return "-"
    return f"{count / GiB:.1f} GiB" if count >= GiB else f"{max(count, 0) / MiB:.0f} MiB"


def plan_text(plan: StagePlan) -> str:
    """The one line a stage's start note shows: "plan: peak CPU RAM ~1.2 GiB, device -, disk 0.3 GiB (...)"."""
    device = "-" if plan.device_bytes is None else f"~{size_text(plan.device_bytes)} on {plan.device}"
    assumed = ", ".join(key.replace("_", " ") + ("" if value is True else f" {value}")
                        for key, value in plan.assumed.items() if value not in (None, False))
    return (f"plan: peak CPU RAM ~{size_text(plan.cpu_bytes + RUNTIME_BYTES)}, device {device}, disk "
            f"{size_text(plan.disk_bytes)} (estimated; {assumed})")


def check_fit(plan: StagePlan, devices: Devices, suggest=None) -> list[str]:
    """One warning per resource the plan exceeds, each ending with the option that would fit (from `suggest(plan,
    resource, free bytes)`: spp_cli/memory_plan/stages.py); also stored in plan.fixes."""
    over = []
    if devices.cpu_ram is not None and plan.cpu_bytes + RUNTIME_BYTES > devices.cpu_ram:
        over.append(("CPU RAM", plan.cpu_bytes + RUNTIME_BYTES, devices.cpu_ram))
    free = devices.accelerators.get(plan.device)
    if plan.device_bytes is not None and free is not None and plan.device_bytes > free:
        over.append((plan.device, plan.device_bytes, free))
    if devices.disk is not None and plan.disk_bytes > devices.disk:
        over.append(("disk", plan.disk_bytes, devices.disk))
    warnings = []
    for resource, needed, have in over:
        fix = suggest(plan, resource, have) if suggest is not None else None
        warnings.append(f"{plan.stage} may not fit: its peak {resource} is estimated at ~{size_text(needed)}, "
                        f"{size_text(have)} is free" + (f"; {fix}" if fix else ""))
    plan.fixes = warnings
    return warnings

"""How the bench measures: wall seconds with the device synchronised, peak memory (CUDA's allocator on a GPU, the
process's peak RSS on a CPU), and the straight line through two depths that extrapolates a few blocks to a model.

Extrapolation. A cost c(k) of a model with k decoder blocks is taken as a + b·k: b is what one block adds, a what
the rest (embeddings, lm_head, the loss, the optimizer's fixed cost) adds once. Measuring at depth 1 and depth B
gives b = (c(B) − c(1)) / (B − 1) and a = c(1) − b, and the whole model's cost is a + b·L at its real depth L.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

CUDA_MEMORY = "torch.cuda.max_memory_allocated (device memory, bytes)"
CPU_MEMORY = ("process peak RSS (VmHWM of /proc/self/status, reset before each measurement, allocations of 64 KiB "
              "and more mmapped so that freed tensors leave RSS at once; bytes)")
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
GLIBC_DEFAULT_MMAP_THRESHOLD = 128 * 1024  # where glibc starts (it then adapts; a mallopt fixes it)


def _set_mmap_threshold(size: int) -> None:
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):  # no glibc: RSS is read as it is
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_MMAP_THRESHOLD, size)


@contextlib.contextmanager
def large_allocations_mmapped() -> Iterator[None]:
    """glibc mmaps every allocation of 64 KiB or more while the block runs (as MALLOC_MMAP_THRESHOLD_=65536 would),
    so that a freed tensor leaves RSS at once and the peak RSS of one step is that step's; then back to glibc's
    starting threshold, 128 KiB (fixed from then on: glibc no longer adapts it)."""
    _set_mmap_threshold(65536)
    try:
        yield
    finally:
        _set_mmap_threshold(GLIBC_DEFAULT_MMAP_THRESHOLD)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(device: str, work: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """The median wall seconds of `repeats` calls of `work` after `warmup` untimed ones (device synchronised)."""
    for _ in range(warmup):
        work()
    seconds = []
    for _ in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def memory_method(device: str) -> str:
    return CUDA_MEMORY if device.startswith("cuda") else CPU_MEMORY


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict]:
    """`with peak_memory(device) as peak:` ... then peak["bytes"] is the peak during the block: device memory on
    CUDA; on a CPU the process's peak RSS since the start of the block (None where /proc is missing); and
    peak["start"] what was allocated (resident) as the block began."""
    result: dict = {"bytes": None, "start": None}  # start: allocated (CUDA) or resident (CPU) bytes on entry
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        result["start"] = int(torch.cuda.memory_allocated(device))
    else:
        kib = _status_kib("VmRSS")
        result["start"] = None if kib is None else kib * 1024
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS
    try:
        yield result
    finally:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
            result["bytes"] = int(torch.cuda.max_memory_allocated(device))
        else:
            kib = _status_kib("VmHWM")
            result["bytes"] = None if kib is None else kib * 1024


def release(device: str) -> None:
    """Free what the last measurement left on a GPU (Python garbage, the CUDA cache); on a CPU reference counting
    has freed it already (a full collection would cost more than the step measured)."""
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def at_depth(model: nn.Module, depth: int) -> Iterator[nn.Module]:
    """The model with only its first `depth` decoder blocks (and config.num_hidden_layers) while the block runs."""
    from pruners.blocks import find_decoder_blocks

    prefix, blocks = find_decoder_blocks(model)
    parent_name, _, attribute = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    setattr(parent, attribute, nn.ModuleList(list(blocks)[:depth]))
    if layers is not None:
        config.num_hidden_layers = depth
    try:
        yield model
    finally:
        setattr(parent, attribute, blocks)
        if layers is not None:
            config.num_hidden_layers = layers


@dataclass
class DepthFit:
    """c(k) = fixed + per_block·k, from measurements at depth 1 and depth `measured` (see the module docstring)."""

    per_block: float
    fixed: float
    measured: float  # c at the measured depth
    note: str | None = None

    def at(self, depth: int) -> float:
        return self.fixed + self.per_block * depth


def fit_depths(at_one: float, at_depth_b: float, depth_b: int) -> DepthFit:
    """The line through (1, at_one) and (depth_b, at_depth_b). With one block, or when the second point is not
    above the first (timing noise on a busy machine), every cost is counted per block (an upper bound)."""
    if depth_b > 1 and at_depth_b > at_one:
        per_block = (at_depth_b - at_one) / (depth_b - 1)
        return DepthFit(per_block, at_one - per_block, at_depth_b)
    note = None if depth_b == 1 else (f"depth {depth_b} measured no more than depth 1 ({at_depth_b:.4g} <= "
                                      f"{at_one:.4g}): counted as {depth_b} equal blocks (an upper bound)")
    return DepthFit(at_depth_b / depth_b, 0.0, at_depth_b, note)


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())

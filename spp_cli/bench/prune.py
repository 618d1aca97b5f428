"""Prune seconds per block and for the whole model: Wanda and SparseGPT, unstructured and 2:4, as `spp prune` runs
them (pruners.sequential.prune_model: the model in CPU memory, one block at a time on the compute device).

Per block: the mean of the driver's block times (onload, statistics, prune, the pruned pass, offload). Whole model:
the measured run (its capture of block 0's inputs included) plus that mean for every block not built.
Peak memory is the device's on a GPU (one block + calibration activations + Hessians: what the whole model needs
too), the process's peak RSS on a CPU.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from spp_cli.bench.measure import peak_memory, release, synchronize
from spp_cli.errors import first_line

CASES = (("wanda", "unstructured"), ("wanda", "2:4"), ("sparsegpt", "unstructured"), ("sparsegpt", "2:4"))


def calibration_ids(vocab_size: int, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) random token ids: the cost of pruning does not depend on which tokens they are."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (nsamples, seqlen), generator=generator)


def prune_case(base: nn.Module, ids: torch.Tensor, device: str, method: str, pattern: str, sparsity: float,
               real_depth: int) -> dict:
    """One method and pattern on a CPU copy of `base`: seconds measured, per block, for the whole model; peak."""
    from pruners.masks import parse_pattern
    from pruners.sequential import PruneOptions, prune_model

    model = copy.deepcopy(base).to("cpu")  # where `spp prune` keeps the model: blocks visit the device one at a time
    nm = pattern != "unstructured"
    options = PruneOptions(method, parse_pattern(pattern, None if nm else sparsity), device=device)
    block_seconds: list[float] = []
    row = {"method": method, "pattern": pattern, "sparsity": 0.5 if nm else sparsity}
    try:
        with peak_memory(device) as peak:
            synchronize(device)
            start = time.perf_counter()
            prune_model(model, ids, options, on_block=lambda report: block_seconds.append(report.seconds))
            synchronize(device)
            seconds = time.perf_counter() - start
    except Exception as error:  # a failing case is reported, the others still run
        return {**row, "error": f"{type(error).__name__}: {first_line(error)}"}
    finally:
        del model
        release(device)
    per_block = statistics.fmean(block_seconds)
    return {**row, "blocks_measured": len(block_seconds), "seconds_measured": seconds,
            "seconds_per_block": per_block,
            "seconds_whole_model": seconds + per_block * (real_depth - len(block_seconds)),
            "peak_memory_bytes": peak["bytes"], "memory_at_start_bytes": peak["start"]}


def bench_prune(base: nn.Module, ids: torch.Tensor, device: str, sparsity: float, real_depth: int,
                tell: Callable[[str], None]) -> list[dict]:
    rows = []
    for method, pattern in CASES:
        tell(f"bench: prune {method} {pattern}, {ids.shape[0]} x {ids.shape[1]} calibration tokens")
        rows.append(prune_case(base, ids, device, method, pattern, sparsity, real_depth))
    return rows

"""Data-parallel evaluation: `accelerate launch -m spp_cli eval ...` or `torchrun --nproc_per_node N -m spp_cli eval`.

Every process loads the whole model on its own device (GPU LOCAL_RANK, or the CPU) and scores a shard of the work:
perplexity batches k, k + N, k + 2N, ... (eval/perplexity.py; each window lands in the same batch as in one
process, so its loss is the same number) and lm-eval's requests, which lm-eval itself shards by rank and gathers
(eval/zeroshot.py hands it this module's rank, world size and accelerator). The per-window losses are gathered and
summed in window order on every process, so the perplexity equals one process's bit for bit; zero-shot metrics are
gathered by lm-eval. Only rank 0 writes results.json (stages/evaluate.py). Torch-free at import.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Processes:
    """This process's place among the launched ones (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """This process's device: a plain "cuda" becomes its own GPU, cuda:LOCAL_RANK, when several run."""
        return f"cuda:{self.local_rank}" if self.world_size > 1 and device == "cuda" else device

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value`, in rank order, on every process (a collective: all must call it)."""
        if self.world_size == 1:
            return [value]
        import torch.distributed

        values: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def accelerator(self, cpu: bool):
        """accelerate's Accelerator for lm-eval's HFLM (its gather and barrier), on the process group started by
        `start_process_group`."""
        from accelerate import Accelerator

        return Accelerator(cpu=cpu)


def launched_processes() -> Processes:
    """From the variables torchrun and accelerate launch set (RANK, WORLD_SIZE, LOCAL_RANK)."""
    return Processes(rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")),
                     local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def start_process_group(processes: Processes, device: str) -> None:
    """Join the launched processes (gloo on the CPU, nccl on GPUs, through accelerate's PartialState, which also
    selects this process's GPU); the group is ended at exit. Nothing to do for one process or a started group."""
    import torch.distributed

    if processes.world_size == 1 or torch.distributed.is_initialized():
        return
    from accelerate import PartialState

    PartialState(cpu=device == "cpu")
    atexit.register(_end_process_group)


def _end_process_group() -> None:
    """Left alive, gloo's threads can abort a finished process at exit (spp_cli/training/trainer.py says why)."""
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

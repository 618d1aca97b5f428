"""Where a block's weights come from and go: the driver's hook for pruning a model that is not all in memory.

`prune_model(..., store=None)` prunes a model whose weights are all loaded (the in-memory path). With a
`BlockStore`, the model may be a skeleton whose decoder blocks hold no weights (meta tensors): the driver asks the
store to fill block i just before it runs (`load_block`) and hands it back once it is pruned and has produced the
next block's inputs (`block_done`), so the store can write it out and free it. A store that remembers finished
blocks can also start the driver later than block 0 (`first_block`, with `resume_inputs`: the hidden states that
enter that block), which is how a killed prune resumes. This package knows nothing of files: the store that reads
and writes safetensors lives in spp_cli/stages/prune_streaming.py.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from pruners.reports import LayerReport


class BlockStore(Protocol):
    first_block: int  # the first block the driver runs; blocks before it are finished and never touched

    def resume_inputs(self) -> torch.Tensor | None:
        """The hidden states entering `first_block` (nsamples, seqlen, hidden), or None when first_block is 0 or
        no calibration data is used (magnitude)."""

    def load_block(self, index: int, block: nn.Module) -> None:
        """Give `block` (decoder block `index`) its weights, on CPU in the compute dtype, before it runs."""

    def block_done(self, index: int, block: nn.Module, reports: list[LayerReport],
                   next_inputs: torch.Tensor | None) -> None:
        """Block `index` is pruned: keep its weights and `reports`, and `next_inputs` (the hidden states entering
        block index + 1; None for magnitude), then free it. A block with nothing to prune gets reports == []."""

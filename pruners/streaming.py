"""Where a block's weights come from and go: the driver's hook for pruning a model that is not all in memory.

`prune_model(..., store=None)` prunes a model whose weights are all loaded (the in-memory path). With a
`BlockStore`, the model may be a skeleton whose decoder blocks hold no weights (meta tensors): the driver asks the
store to fill block i just before it runs (`load_block`) and hands it back once it is pruned and has produced the
next block's inputs (`block_done`), so the store can write it out and free it. A store that remembers finished
blocks can also start the driver later than block 0 (`first_block`, with `resume_inputs`: the hidden states that
enter that block), which is how a killed prune resumes. OWL's dense pass over every block before the first is
pruned loads and unloads each block once more (`unload_block`) and keeps its profile with the run
(`save_owl_profile`). This package knows nothing of files: the store that reads and writes safetensors lives in
spp_cli/stages/prune_streaming.py.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from pruners.reports import LayerReport, OwlProfile


class BlockStore(Protocol):
    first_block: int  # the first block the driver runs; blocks before it are finished and never touched

    def resume_inputs(self) -> torch.Tensor | None:
        """The hidden states entering `first_block` (nsamples, seqlen, hidden), or None when first_block is 0 or
        no calibration data is used (magnitude)."""

    def load_block(self, index: int, block: nn.Module) -> None:
        """Give `block` (decoder block `index`) its weights, on CPU in the compute dtype, before it runs."""

    def unload_block(self, index: int, block: nn.Module) -> None:
        """Free `block` (left weightless) without keeping anything: OWL's dense pass (pruners/owl.py) reads every
        block before the first is pruned, and the prune pass loads it again."""

    def saved_owl_profile(self) -> OwlProfile | None:
        """The OWL profile `save_owl_profile` kept for this run (a killed run's, when resuming), else None."""

    def save_owl_profile(self, profile: OwlProfile) -> None:
        """Keep the OWL profile with the run, so a resumed prune uses the ratios its finished blocks got."""

    def block_done(self, index: int, block: nn.Module, reports: list[LayerReport],
                   next_inputs: torch.Tensor | None) -> None:
        """Block `index` is pruned: keep its weights and `reports`, and `next_inputs` (the hidden states entering
        block index + 1; None for magnitude), then free it. A block with nothing to prune gets reports == [].
        The store may keep the block in the background: `block` itself is emptied before this returns, but
        `next_inputs` is read until the next block_done (or flush) returns, so the driver does not overwrite it
        before then."""

    def flush(self) -> None:
        """Return once every block handed to block_done is kept; raise what keeping one of them raised. The driver
        calls it after the last block."""

"""The driver's hook interface: what a method adds to the block loop, without the loop knowing the method.

A hook (in the spirit of llm-compressor's modifiers, with sparsegpt.py's small objects) is a `PruneHook` whose
methods pruners/sequential.py calls at fixed points; each default does nothing. For every decoder block with target
linears, with the block on the compute device (`BlockContext`):

    begin_block(block)        nothing observed yet; block.pattern may still change (OWL: the block's sparsity)
      dense pass              statistics of every target linear, and the dense outputs of the leading batches that
                              hold the first max(hook.dense_windows) windows, into block.outputs
    after_statistics(block)   statistics complete, nothing pruned; block.unobserved lists the linears no input
                              reached (any left there afterwards is an error); reports added to block.reports
                              here follow those of the linears the driver prunes next
      prune                   every observed linear (true_sequential: group by group, observed again in between)
    after_prune(block)        masks chosen and applied (block.reports); the pruned pass has not run, so
                              block.inputs are the block's inputs and block.outputs[batch] the dense outputs of
                              block.batches[:block.dense_batches]; weights may still change here (block-wise
                              reconstruction: train the kept weights to match the dense outputs)
      pruned pass             pruned_output(block, batch, out) for each batch, before `out` replaces the batch's
                              dense output in block.outputs
    end_block(block)          block.outputs holds the next block's inputs; block.report goes to on_block next

Everything runs under torch.no_grad (a hook that trains enables grad itself) with the model in eval mode.
Around the run: start(run) before the first block (OWL's dense pass over the whole model) and finish(run) after
the last or on failure. make_pruner(name, linear, inner) chooses the object that observes and prunes one linear;
`inner()` builds what the hooks before it (and the method) would. Without calibration data (magnitude) a block
runs begin_block, prune, after_prune and end_block only.

Users: pruners/owl.py (OwlSparsity), dsnot.py (DSnoTRefinement), experts.py (ExpertFallback), reconstruct.py
(BlockReconstruction), and `ReconstructionError` below (the relative output error each BlockReport carries).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from pruners.masks import SparsityPattern
from pruners.reports import BlockReport, LayerReport
from pruners.streaming import BlockStore

ERROR_WINDOWS = 8  # the block reconstruction error is measured on the first 8 calibration windows: it is a report,
# not an input to pruning, and running every window through the whole dense block only for it cost a sixth of the
# forward work (spec/pruners.md's references report no such error at all)


@dataclass
class PruneRun:
    """What the whole run works on: hooks read it, only the driver changes it."""

    model: nn.Module
    prefix: str  # the blocks' ModuleList name, e.g. "model.layers"
    blocks: nn.ModuleList
    linears: dict[str, nn.Module]  # full name -> target linear, in module order
    per_block: list[dict[str, nn.Module]]  # the same, per block
    pattern: SparsityPattern  # the requested pattern (a block's own may differ: BlockContext.pattern)
    device: torch.device  # where each block is computed
    calibration_ids: torch.Tensor | None  # (nsamples, seqlen); None when nothing needs data
    batches: list[slice]  # the calibration samples of each forward
    true_sequential: bool
    store: BlockStore | None  # where block weights come from and go (pruners/streaming.py)
    hooks: list[PruneHook]
    build_pruner: Callable[[nn.Module, str], Any]  # (linear, name) -> the method's own pruner

    @property
    def first_block(self) -> int:
        return self.store.first_block if self.store is not None else 0

    def make_pruner(self, name: str) -> Any:
        """The object that observes and prunes linear `name`: the method's, as each hook's make_pruner wraps it."""
        linear = self.linears[name]
        make = partial(self.build_pruner, linear, name)
        for hook in self.hooks:
            make = partial(hook.make_pruner, name, linear, make)
        return make()


@dataclass
class BlockContext:
    """One block while it is pruned. Without calibration data, inputs/outputs/calls are None and batches empty."""

    index: int
    module: nn.Module  # the decoder block, on `device`
    linears: dict[str, nn.Module]  # full name -> target linear of this block, in module order
    pattern: SparsityPattern  # the block's pattern (begin_block may change it)
    report: BlockReport  # filled by the driver and the hooks, sent to on_block after end_block
    make_pruner: Callable[[str], Any]  # PruneRun.make_pruner
    device: torch.device
    inputs: torch.Tensor | None = None  # (nsamples, seqlen, hidden): what enters the block
    outputs: torch.Tensor | None = None  # same shape: dense outputs of the dense batches, then the pruned outputs
    calls: list[tuple[tuple, dict]] | None = None  # per batch: (extra args, keyword args) the model passes the block
    batches: list[slice] = field(default_factory=list)  # the calibration samples of each forward
    dense_batches: int = 0  # how many leading batches run the whole dense block (their outputs kept)
    reports: list[LayerReport] = field(default_factory=list)  # one per pruned linear, in pruning order
    unobserved: list[str] = field(default_factory=list)  # linears no calibration input reached


class PruneHook:
    """A method's additions to the driver; every method is a no-op here (the module docstring says when each runs)."""

    needs_calibration = False  # the run needs calibration data even when the pruning method does not (OWL)
    dense_windows = 0  # how many leading calibration windows' dense block outputs this hook reads

    def start(self, run: PruneRun) -> None:
        pass

    def finish(self, run: PruneRun) -> None:
        pass

    def make_pruner(self, name: str, linear: nn.Module, inner: Callable[[], Any]) -> Any:
        return inner()

    def begin_block(self, block: BlockContext) -> None:
        pass

    def after_statistics(self, block: BlockContext) -> None:
        pass

    def after_prune(self, block: BlockContext) -> None:
        pass

    def pruned_output(self, block: BlockContext, batch: slice, out: torch.Tensor) -> None:
        pass

    def end_block(self, block: BlockContext) -> None:
        pass


def error_terms(out: torch.Tensor, dense: torch.Tensor) -> tuple[float, float]:
    """(||Y - Ŷ||², ||Y||²) in fp32 of a batch's pruned outputs Ŷ = `out` and dense outputs Y = `dense`."""
    dense = dense.to(out.device).float()
    return float((out.float() - dense).square().sum()), float(dense.square().sum())


class ReconstructionError(PruneHook):
    """||Y - Ŷ||² / ||Y||² of each block over the tokens of the first ERROR_WINDOWS calibration windows (all when
    there are fewer), Y the dense block's outputs and Ŷ the pruned block's, both fed the pruned prefix's outputs.
    Sets the BlockReport's reconstruction_error and error_windows; leaves NaN where no pruned pass ran (magnitude)."""

    dense_windows = ERROR_WINDOWS

    def begin_block(self, block: BlockContext) -> None:
        self.squared_error, self.squared_norm, self.windows = 0.0, 0.0, None

    def pruned_output(self, block: BlockContext, batch: slice, out: torch.Tensor) -> None:
        if batch.start >= ERROR_WINDOWS:
            return
        # still the dense output: the driver copies after us
        squared_error, squared_norm = error_terms(out, block.outputs[batch])
        self.squared_error += squared_error
        self.squared_norm += squared_norm
        self.windows = batch.stop

    def end_block(self, block: BlockContext) -> None:
        if self.windows is None:
            return
        block.report.reconstruction_error = (self.squared_error / self.squared_norm if self.squared_norm > 0
                                             else 0.0)
        block.report.error_windows = self.windows


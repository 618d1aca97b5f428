"""OWL: Outlier-Weighted Layerwise sparsity (Yin et al., ICML 2024; luuyin/OWL `lib/prune_all.py`).

A block with more outlier features gets a lower sparsity; the mean over blocks stays the target. As the reference
computes it (`prune_wanda_outlier`, `prune_sparsegpt_outlier`, `prune_mag_outlier`, all the same):

1. One pass over the *dense* model, block by block, collecting Wanda's statistics (scaler_row_j = mean over
   calibration sequences of ||x_j||^2) of every target linear of the block.
2. Per block: the Wanda metric |W_ij| * sqrt(scaler_row_j) of all its target linears, flattened together; the
   outlier ratio is 100 * (number of entries > M * their mean) / (number of entries)  (`check_outlier_mean`).
3. Across blocks: n_i = (r_i - min r) / (max r - min r) * 2*lambda  (in [0, 2*lambda]); density_i =
   n_i - mean(n) + (1 - s); sparsity_i = 1 - density_i. So mean(sparsity) = s exactly, max - min = 2*lambda, and
   the block with the most outliers is pruned least.
The block ratios then replace the uniform sparsity for Wanda, SparseGPT or magnitude (unstructured only):
`OwlSparsity`, a driver hook (pruners/hooks.py), runs the dense pass before the first block and sets each block's.
With a BlockStore (a streamed prune) the dense pass holds one block at a time; the prune pass then loads each again.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pruners.blocks import block_outputs, capture_block_inputs
from pruners.errors import PrunerOptionError
from pruners.hooks import BlockContext, PruneHook, PruneRun
from pruners.masks import SparsityPattern
from pruners.reports import OwlProfile
from pruners.streaming import BlockStore
from pruners.wanda import accumulate_input_norms, wanda_score

DEFAULT_THRESHOLD = 5.0  # M: the reference README's commands and the paper (main.py's argparse default is 3)
DEFAULT_LAMBDA = 0.08  # the reference README's commands and the paper


def check_owl_options(threshold: float, lam: float) -> None:
    """Raise PrunerOptionError unless M > 0 and 0 < lambda < 0.5 (the spread 2*lambda must fit inside (0, 1))."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise PrunerOptionError(f"owl_threshold {threshold!r} is invalid: use a number > 0 (the paper's M is 5)")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam < 0.5:
        raise PrunerOptionError(f"owl_lambda {lam!r} is out of range: use a number in (0, 0.5) (the paper's is 0.08)")


def outlier_ratio(metrics: list[torch.Tensor], threshold: float) -> float:
    """100 * #(entries > threshold * mean) / #entries over every entry of `metrics` taken together (in percent)."""
    total = sum(m.numel() for m in metrics)
    mean = sum(float(m.double().sum()) for m in metrics) / total
    count = sum(int((m > threshold * mean).sum()) for m in metrics)
    return 100.0 * count / total


def owl_sparsities(outlier_ratios: list[float], target: float, lam: float) -> list[float]:
    """Block sparsities from block outlier ratios (the reference's min-max rescale, in float64).

    All ratios equal (the reference would divide by zero) gives the uniform target.
    """
    ratios = np.asarray(outlier_ratios, dtype=np.float64)
    spread = ratios.max() - ratios.min()
    if spread == 0:
        return [float(target)] * len(ratios)
    normalised = (ratios - ratios.min()) * (1 / spread * lam * 2)
    density = normalised - np.mean(normalised) + (1 - target)
    return [float(1 - d) for d in density]


class _InputNorms:
    """Forward hooks feeding Wanda's scaler_row (in,) of each linear, as the reference's WrappedGPT does."""

    def __init__(self, linears: dict[str, nn.Linear], device: torch.device) -> None:
        self.scaler_row = {name: torch.zeros(lin.in_features, dtype=torch.float32, device=device)
                           for name, lin in linears.items()}
        self._count = dict.fromkeys(linears, 0)
        self._handles = [lin.register_forward_hook(self._hook(name)) for name, lin in linears.items()]

    def _hook(self, name: str):
        def observe(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._count[name] = accumulate_input_norms(self.scaler_row[name], self._count[name], args[0])
        return observe

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def owl_profile(model: nn.Module, blocks: nn.ModuleList, per_block: list[dict[str, nn.Linear]],
                calibration_ids: torch.Tensor, batches: list[slice], device: torch.device, target: float,
                threshold: float = DEFAULT_THRESHOLD, lam: float = DEFAULT_LAMBDA,
                store: BlockStore | None = None) -> OwlProfile:
    """The OWL block sparsities of `model` (not modified): one dense pass over every block up to the last one with
    target linears, each fed the previous dense block's outputs (the reference's propagation).

    per_block[i]: name -> linear of block i's targets. calibration_ids: (nsamples, seqlen); batches slice it.
    store (pruners/streaming.py): the blocks may be weightless; each is filled by store.load_block just before its
    pass and emptied by store.unload_block right after (one block in memory at a time), and the profile is kept
    with the run (store.save_owl_profile). A profile the store already holds (a killed run's, when resuming) is
    returned as it is, so the remaining blocks get the ratios the finished ones were pruned with.
    Raises PrunerOptionError when a block's sparsity falls outside (0, 1) (lambda too large for the target).
    """
    check_owl_options(threshold, lam)
    if store is not None and (saved := store.saved_owl_profile()) is not None:
        return saved
    last = max(i for i, linears in enumerate(per_block) if linears)
    captured = capture_block_inputs(model, blocks, calibration_ids, batches, device,
                                    lambda shape, dtype: torch.device("cpu"))
    inputs, outputs = captured.hidden, torch.empty_like(captured.hidden)
    ratios: list[float | None] = [None] * len(blocks)
    for index in range(last + 1):
        block, linears = blocks[index], per_block[index]
        if store is not None:
            store.load_block(index, block)
        home = next(block.parameters()).device
        block.to(device)
        collector = _InputNorms(linears, device)
        try:
            for batch, out in block_outputs(block, inputs, captured.calls[index], batches, device):
                outputs[batch].copy_(out)
        finally:
            collector.remove()
        if linears:
            metrics = [wanda_score(lin.weight.float(), collector.scaler_row[name]) for name, lin in linears.items()]
            ratios[index] = outlier_ratio(metrics, threshold)
        block.to(home)
        if store is not None:
            store.unload_block(index, block)
        inputs, outputs = outputs, inputs
    pruned = [i for i, r in enumerate(ratios) if r is not None]
    values = owl_sparsities([ratios[i] for i in pruned], target, lam)
    sparsities: list[float | None] = [None] * len(blocks)
    for i, value in zip(pruned, values, strict=True):
        if not 0 < value < 1:
            raise PrunerOptionError(
                f"OWL gives block {i} sparsity {value:.4f}, outside (0, 1): lower owl_lambda (now {lam:g}) "
                f"below {min(target, 1 - target) / 2:g} or move the sparsity away from 0 and 1"
            )
        sparsities[i] = value
    profile = OwlProfile(ratios, sparsities)
    if store is not None:
        store.save_owl_profile(profile)
    return profile


class OwlSparsity(PruneHook):
    """OWL in the driver: the dense pass over the model before the first block, then each block's sparsity."""

    needs_calibration = True  # the outlier ratios need data even for magnitude

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, lam: float = DEFAULT_LAMBDA) -> None:
        self.threshold, self.lam = threshold, lam
        self.profile: OwlProfile | None = None

    def start(self, run: PruneRun) -> None:
        self.profile = owl_profile(run.model, run.blocks, run.per_block, run.calibration_ids, run.batches,
                                   run.device, run.pattern.sparsity, self.threshold, self.lam, run.store)

    def begin_block(self, block: BlockContext) -> None:
        sparsity = self.profile.sparsities[block.index]
        if sparsity is not None:
            block.pattern = SparsityPattern(sparsity)
        block.report.outlier_ratio = self.profile.outlier_ratios[block.index]

"""What pruning reports back: one LayerReport per pruned linear, one BlockReport per decoder block, and OWL's
profile (kept with a streamed run, pruners/streaming.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LayerReport:
    name: str  # full module name, e.g. "model.layers.0.self_attn.q_proj"
    sparsity: float  # fraction of exact zeros in the weight after pruning
    seconds: float  # time spent choosing the mask and updating the weight (no forward passes)
    error: float | None  # SparseGPT's summed OBS loss (the reference's `error`); None for the other methods
    damping: float | None  # SparseGPT: damping actually used, as a fraction of mean(diag H); None otherwise
    fallback: str | None = None  # "magnitude" for an expert that saw too few calibration tokens (pruners/experts.py)
    tokens: int | None = None  # calibration tokens an expert's linear saw; None for ordinary linears
    reconstruct: dict | None = None  # refine reconstruct: {"block": index, "before": error, "after": error}, its
    # block's relative output errors before and after training (the BlockReport's two; here too because a resumed
    # streamed prune keeps LayerReports, so spp.json still has every block's); None without reconstruct


@dataclass
class BlockReport:
    index: int  # position of the block in the decoder's ModuleList
    seconds: float  # wall time for the whole block: forward passes, statistics and pruning
    reconstruction_error: float  # ||out_dense - out_pruned||^2 / ||out_dense||^2 over the tokens of the first
    # pruners.hooks.ERROR_WINDOWS calibration windows (all when there are fewer); NaN for magnitude (no data)
    sparsity: float | None = None  # the block's target sparsity (differs across blocks with OWL)
    outlier_ratio: float | None = None  # OWL: percent of Wanda-metric entries above M x their mean; None otherwise
    total: int | None = None  # how many blocks the model has
    error_windows: int | None = None  # how many calibration windows reconstruction_error is measured on
    error_before_reconstruct: float | None = None  # refine reconstruct: the same error before the block's kept
    # weights were trained (reconstruction_error is after); None without reconstruct


@dataclass
class OwlProfile:
    """OWL's per-block result (pruners/owl.py)."""

    outlier_ratios: list[float | None]  # per block, in percent; None for a block without target linears
    sparsities: list[float | None]  # per block; None where nothing is pruned


def layer_report(name: str, weight, seconds: float, error: float | None = None, damping: float | None = None):
    """A LayerReport for `weight` as it is now (counts its exact zeros)."""
    zeros = int((weight == 0).sum())
    return LayerReport(name, zeros / weight.numel(), seconds, error, damping)

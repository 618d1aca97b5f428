"""One-shot pruning of causal LMs: magnitude, Wanda and SparseGPT, unstructured or N:M, one block at a time.

This package knows nothing of files, the CLI or recipes. Entry point: `pruners.sequential.prune_model`.
Each pruner is a small object built on one nn.Linear: `add_batch(inp)` observes its inputs (fed by a forward
hook), `prune(pattern)` zeroes weights in place and returns a LayerReport.
"""

from pruners.magnitude import MagnitudePruner
from pruners.masks import PatternError, SparsityPattern, parse_pattern
from pruners.reports import BlockReport, LayerReport
from pruners.sparsegpt import CholeskyError, SparseGPTPruner
from pruners.wanda import WandaPruner

PRUNERS: dict[str, type] = {
    "magnitude": MagnitudePruner,
    "wanda": WandaPruner,
    "sparsegpt": SparseGPTPruner,
}

__all__ = [
    "PRUNERS",
    "BlockReport",
    "CholeskyError",
    "LayerReport",
    "MagnitudePruner",
    "PatternError",
    "SparseGPTPruner",
    "SparsityPattern",
    "WandaPruner",
    "parse_pattern",
]

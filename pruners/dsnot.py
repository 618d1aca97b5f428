"""DSnoT: training-free mask refinement by prune-and-grow within each row (Zhang et al., ICLR 2024; zyxxmu/DSnoT
`lib/prune.py::prune_DSnoT`, `lib/layerwrapper.py`). The refinement changes which weights are zero, not their values.

Statistics per input feature j (fp32, the reference's WrappedGPT): Wanda's scaler_row_j; sum_metric_row_j = mean over
calibration sequences of sum over the sequence's tokens of x_j; Var(x_j) over tokens (a token-weighted running mean
of per-batch variances). SparseGPT's Hessian too when the initial mask is SparseGPT's.

Initial mask: the initial metric's int(c*s) lowest per row (stable sort), or its N lowest per group of M. The
metric is Wanda's |W|*sqrt(scaler_row), or SparseGPT's OBS score W^2 / [U]_jj^2 (U = chol((H + damp I)^-1), the
reference's `initial_method sparsegpt`) on the dense weights.
Per row, the expected output error of the mask is e = sum over pruned j of W_j * sum_metric_row_j. Each cycle
regrows one pruned weight -- the next from the top (e > 0) or bottom (e <= 0) of the pruned weights ordered by
W_j*sum_metric_row_j / Var_j^pow -- and prunes one kept weight -- unstructured: the next from the kept weights
ordered by Wanda score with the sign order of `return_reorder_indice`, from the front (e >= 0) or back (e < 0);
N:M: the lowest initial metric among the kept weights of the regrown weight's group. A swap is made while
|e| > update_threshold (and, N:M only, while e keeps its initial sign); a row that stops never restarts; at most
max_cycles cycles. Same count per row, and N:M groups stay valid, by construction.

Differences from the reference, all where it would break the count or crash: a row also stops when its next
candidates are not a pruned weight to regrow and a kept weight to prune (the reference walks into the kept
weights' zero scores, or past the end of its candidate list, once a row has fewer candidates than max_cycles,
i.e. in narrow layers), and features with zero variance keep an undivided score (the reference divides by 0).
The reference's sparsegpt initial mask uses a Hessian that its WrappedGPT never accumulates (all zeros, so every
input counts as dead and the metric is 0); here it is the real Hessian, and after refinement the kept weights get
SparseGPT's OBS update for the final mask (`sparsegpt_prune_weight(fixed_mask=...)`): without it, sparsegpt +
dsnot would throw away SparseGPT's weight reconstruction (10x the block error on the test models).
Narrow rows (faithful, not a port bug; REPORT-dsnot.md): max_cycles = 50 is sized for LLaMA's 4096-wide rows
(50 swaps of ~1,230 kept weights at 70%). In a 128-wide row (the tiny model: 38 kept) 50 cycles swap out most
kept weights, and once a row's kept weights of the sign that cuts |e| are used up, the prune cursor walks on into
the other sign, highest Wanda score first (the reference's `return_reorder_indice` lists do so too), so |e| grows.
Both raise the layer's output error: Wanda 70% + DSnoT on the tiny model is worse than Wanda alone.
In the driver, `DSnoTRefinement` (a hook, pruners/hooks.py) makes a DSnoTPruner of every linear: the refinement
needs its own statistics and, after SparseGPT, the OBS update for the refined mask, so it cannot run after a
method's pruner has already updated the weights for the unrefined one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from pruners.hooks import PruneHook, PruneRun
from pruners.masks import SparsityPattern, nm_mask
from pruners.reports import LayerReport, layer_report
from pruners.sparsegpt import CholeskyError, accumulate_hessian, inverse_cholesky_upper, sparsegpt_prune_weight
from pruners.wanda import accumulate_input_norms, wanda_score

MAX_CYCLES = 50  # --max_cycle_time
UPDATE_THRESHOLD = 0.1  # --update_threshold
POW_OF_VAR_REGROWING = 1.0  # --pow_of_var_regrowing
SKIPPED_SUBMODULE = "mlp"  # --skip_layer mlp: linears under a block's `mlp` keep their initial mask


def refines(relative_name: str) -> bool:
    """Whether DSnoT refines a linear, by its name inside its block ("self_attn.q_proj": yes, "mlp.up_proj": no)."""
    return relative_name.split(".", 1)[0] != SKIPPED_SUBMODULE


def reorder_by_sign(values: torch.Tensor) -> torch.Tensor:
    """The reference's `return_reorder_indice` (rows, k) -> (rows, k) positions: per row, the negative entries'
    positions first to last, then the positive entries' positions last to first (so a cursor from the front meets
    negatives in order, one from the back meets positives in order); a zero entry adds position 0, as there."""
    cols = values.shape[1]
    positions = torch.arange(cols, device=values.device, dtype=torch.float64).repeat(values.shape[0], 1)
    positive, negative = positions.clone(), positions.clone()
    positive[~(values > 0)] = float("inf")
    negative[~(values < 0)] = float("inf")
    positive = torch.flip(torch.sort(positive, dim=1).values, dims=[1])
    negative = torch.sort(negative, dim=1).values
    positive[positive == float("inf")] = 0
    negative[negative == float("inf")] = 0
    return (positive + negative).to(torch.int64)


class _Cursor:
    """Two read positions per row into an ordered candidate list (rows, k): one from the front, one from the back."""

    def __init__(self, order: torch.Tensor) -> None:
        rows, k = order.shape
        self.order = order
        self.position = torch.zeros((rows, 2), dtype=torch.long, device=order.device)
        self.position[:, 1] = k - 1
        self.step = torch.ones((rows, 2), dtype=torch.long, device=order.device)
        self.step[:, 1] = -1

    def take(self, from_back: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidate column (rows, 1), in bounds (rows, 1)) at each row's chosen end; that end moves on by one."""
        side = from_back.long()
        position = torch.gather(self.position, 1, side)
        inside = (position >= 0) & (position < self.order.shape[1])
        column = torch.gather(self.order, 1, position.clamp(0, self.order.shape[1] - 1))
        self.position.scatter_(1, side, position + torch.gather(self.step, 1, side))
        return column, inside


def _regrow_order(expected: torch.Tensor, mask: torch.Tensor, var: torch.Tensor, pow_of_var: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(error e (rows, 1), columns ordered by pruned W_j*E_j / Var_j^pow with kept ones scored 0 (rows, c))."""
    score = expected.masked_fill(~mask, 0)
    error = score.sum(dim=1, keepdim=True)
    if pow_of_var:
        divisor = torch.pow(var.reshape(1, -1), pow_of_var)
        score = torch.where(divisor > 0, score / divisor, score)
    return error, torch.sort(score, dim=1, stable=True).indices


def refine_unstructured(initial_metric: torch.Tensor, wanda_metric: torch.Tensor, expected: torch.Tensor,
                        var: torch.Tensor, sparsity: float, max_cycles: int = MAX_CYCLES,
                        threshold: float = UPDATE_THRESHOLD, pow_of_var: float = POW_OF_VAR_REGROWING
                        ) -> torch.Tensor:
    """Bool mask (rows, c), True = prune, with exactly int(c*sparsity) per row.

    initial_metric, wanda_metric, expected (= W * sum_metric_row): (rows, c) fp32; var: (c,).
    """
    rows, cols = initial_metric.shape
    count = int(cols * sparsity)
    order = torch.sort(initial_metric, dim=1, stable=True).indices
    mask = torch.zeros((rows, cols), dtype=torch.bool, device=order.device).scatter_(1, order[:, :count], True)
    if max_cycles <= 0 or count == 0 or count == cols:
        return mask
    error, regrow_order = _regrow_order(expected, mask, var, pow_of_var)
    kept_by_wanda = torch.sort(wanda_metric.masked_fill(mask, float("inf")), dim=1, stable=True).indices
    kept_by_wanda = kept_by_wanda[:, :cols - count]  # the kept weights, lowest Wanda score first
    prune_order = torch.gather(kept_by_wanda, 1, reorder_by_sign(torch.gather(expected, 1, kept_by_wanda)))
    regrow, prune = _Cursor(regrow_order), _Cursor(prune_order)
    active = torch.ones((rows, 1), dtype=torch.bool, device=mask.device)
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        grow_column, grow_ok = regrow.take(error > 0)
        prune_column, prune_ok = prune.take(error < 0)
        valid = grow_ok & prune_ok & torch.gather(mask, 1, grow_column) & ~torch.gather(mask, 1, prune_column)
        active &= valid & (error.abs() > threshold)  # the reference's default --without_same_sign
        _swap(mask, error, expected, grow_column, prune_column, active)
    return mask


def refine_nm(initial_metric: torch.Tensor, expected: torch.Tensor, var: torch.Tensor, n: int, m: int,
              max_cycles: int = MAX_CYCLES, threshold: float = UPDATE_THRESHOLD,
              pow_of_var: float = POW_OF_VAR_REGROWING) -> torch.Tensor:
    """Bool mask (rows, c), True = prune, with exactly n in every group of m consecutive columns of every row."""
    mask = nm_mask(initial_metric, n, m)
    if max_cycles <= 0:
        return mask
    error, regrow_order = _regrow_order(expected, mask, var, pow_of_var)
    initial_sign = torch.sign(error)
    metric = initial_metric.masked_fill(mask, float("inf"))  # pruned, and later pruned-by-swap, are never chosen
    regrow = _Cursor(regrow_order)
    offsets = torch.arange(m, device=mask.device).reshape(1, m)
    active = torch.ones_like(error, dtype=torch.bool)
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        grow_column, grow_ok = regrow.take(error > 0)
        group = grow_column - grow_column % m + offsets  # (rows, m): the regrown weight's group
        lowest = torch.topk(torch.gather(metric, 1, group), 1, dim=1, largest=False)
        prune_column = torch.gather(group, 1, lowest.indices)
        after = error + torch.gather(expected, 1, prune_column) - torch.gather(expected, 1, grow_column)
        valid = grow_ok & torch.gather(mask, 1, grow_column) & torch.isfinite(lowest.values)
        active &= valid & (initial_sign == torch.sign(after)) & (error.abs() > threshold)
        metric.scatter_(1, prune_column, float("inf"))
        _swap(mask, error, expected, grow_column, prune_column, active)
    return mask


def _swap(mask, error, expected, grow_column, prune_column, active) -> None:
    """Where `active`: unprune grow_column, prune prune_column, and update the row's error e in place."""
    grow_value = torch.gather(expected, 1, grow_column)
    prune_value = torch.gather(expected, 1, prune_column)
    mask.scatter_(1, prune_column, torch.gather(mask, 1, prune_column) | active)
    mask.scatter_(1, grow_column, torch.gather(mask, 1, grow_column) & ~active)
    error += torch.where(active, prune_value, torch.zeros_like(prune_value))  # two steps, as the reference
    error -= torch.where(active, grow_value, torch.zeros_like(grow_value))


def accumulate_mean_and_variance(sum_row: torch.Tensor, variance: torch.Tensor, counts: list[int],
                                 inp: torch.Tensor) -> None:
    """Fold a batch (B, T, c) or (T, c) into sum_metric_row (c,) and Var (c,) in place; counts = [sequences, tokens].

    sum_row <- sum_row * n/(n+B) + (sum over the batch's tokens of x) / (n+B); Var is the token-weighted running
    mean of each batch's (biased) variance, as the reference's WrappedGPT.add_batch computes them.
    """
    if inp.dim() == 2:
        inp = inp.unsqueeze(0)
    tokens = inp.reshape(-1, inp.shape[-1]).float()  # (B*T, c)
    batch_variance = torch.var(tokens, dim=0, unbiased=False)
    seen, new = counts[1], tokens.shape[0]
    variance.copy_(batch_variance if seen == 0 else (variance * seen + batch_variance * new) / (seen + new))
    counts[1] += new
    sequences = counts[0] + inp.shape[0]
    sum_row.mul_(counts[0] / sequences).add_(tokens.sum(dim=0) / sequences)
    counts[0] = sequences


class DSnoTPruner:
    """Wanda's or SparseGPT's initial mask for one nn.Linear, refined by DSnoT (`refine=False`: initial mask only)."""

    needs_calibration = True

    def __init__(self, layer: nn.Linear, name: str, initial: str = "wanda", refine: bool = True,
                 max_cycles: int = MAX_CYCLES) -> None:
        self.layer, self.name, self.initial = layer, name, initial
        self.refine, self.max_cycles = refine, max_cycles
        cols, device = layer.in_features, layer.weight.device
        self.scaler_row = torch.zeros(cols, dtype=torch.float32, device=device)
        self.sum_row = torch.zeros(cols, dtype=torch.float32, device=device)
        self.variance = torch.zeros(cols, dtype=torch.float32, device=device)
        self.hessian = torch.zeros((cols, cols), dtype=torch.float32, device=device) if initial == "sparsegpt" else None
        self.counts = [0, 0]  # sequences, tokens (mean and variance)
        self.nsamples = 0  # sequences (scaler_row, Hessian)

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor) -> None:
        if self.hessian is not None:
            accumulate_hessian(self.hessian, self.nsamples, inp)
        self.nsamples = accumulate_input_norms(self.scaler_row, self.nsamples, inp)
        accumulate_mean_and_variance(self.sum_row, self.variance, self.counts, inp)

    def share_statistics(self, other: DSnoTPruner) -> None:
        """Use `other`'s statistics (a linear fed the very same input tensor, e.g. k_proj beside q_proj)."""
        self.scaler_row, self.sum_row, self.variance = other.scaler_row, other.sum_row, other.variance
        self.hessian, self.counts, self.nsamples = other.hessian, other.counts, other.nsamples

    def _initial_metric(self, weight: torch.Tensor) -> torch.Tensor:
        if self.initial == "wanda":
            return wanda_score(weight, self.scaler_row)
        hessian = self.hessian.clone()
        dead = torch.diagonal(hessian) == 0
        torch.diagonal(hessian)[dead] = 1
        weight = weight.masked_fill(dead.reshape(1, -1), 0)
        try:
            upper, _ = inverse_cholesky_upper(hessian)
        except CholeskyError as error:
            raise CholeskyError(f"{self.name}: {error}; use more calibration samples or --ignore it") from None
        return weight**2 / torch.diagonal(upper).reshape(1, -1) ** 2

    @torch.no_grad()
    def prune(self, pattern: SparsityPattern) -> LayerReport:
        """Zero the refined mask's weights of `self.layer` in place; frees the statistics."""
        weight = self.layer.weight
        pattern.check_width(weight.shape[1], self.name)
        if self.nsamples == 0:
            raise RuntimeError(f"dsnot: no calibration input reached {self.name}")
        start = time.perf_counter()
        dense = weight.float()
        initial = self._initial_metric(dense)
        expected = dense * self.sum_row.reshape(1, -1)
        cycles = self.max_cycles if self.refine else 0
        if pattern.is_nm:
            mask = refine_nm(initial, expected, self.variance, pattern.n, pattern.m, cycles)
        else:
            mask = refine_unstructured(initial, wanda_score(dense, self.scaler_row), expected, self.variance,
                                       pattern.sparsity, cycles)
        loss = damping = None
        if self.initial == "sparsegpt":  # SparseGPT's OBS update of the kept weights, for the refined mask
            new_weight, losses, damping = sparsegpt_prune_weight(weight, self.hessian, pattern, fixed_mask=mask)
            weight.copy_(new_weight)
            loss = float(losses.sum())
        else:
            weight.masked_fill_(mask, 0)
        self.scaler_row = self.sum_row = self.variance = self.hessian = None
        return layer_report(self.name, weight, time.perf_counter() - start, loss, damping)


class DSnoTRefinement(PruneHook):
    """Prunes every target linear with a DSnoTPruner starting from `initial`'s mask (wanda or sparsegpt); linears
    under a block's `mlp` keep the initial mask (the reference's --skip_layer mlp). Replaces the method's pruner,
    so it comes first among the hooks."""

    def __init__(self, initial: str) -> None:
        self.initial = initial
        self.prefix = ""

    def start(self, run: PruneRun) -> None:
        self.prefix = run.prefix

    def make_pruner(self, name: str, linear: nn.Module, inner: Callable[[], object]) -> DSnoTPruner:
        relative = name[len(self.prefix) + 1:].split(".", 1)[1]  # "self_attn.q_proj" of "model.layers.0.self_attn..."
        return DSnoTPruner(linear, name, initial=self.initial, refine=refines(relative))

"""SparseGPT (spec/pruners.md §1): prune one linear layer and update its remaining weights with OBS.

Statistics: H = (2/N_seq) * sum over calibration tokens of x x^T, accumulated in fp32 (`add_batch`).
Solve (`sparsegpt_prune_weight`, the reference `fasterprune` with blocksize 128 and 1% damping):
  dead inputs (H_jj = 0) get H_jj = 1 and W[:, j] = 0; H += 0.01 * mean(diag H) * I; U = chol(H^-1, upper);
  then columns left to right in blocks of 128: choose the block's mask (unstructured: one `<=` threshold over
  the whole rows x 128 block on w^2 / U_jj^2; N:M: lazily at each group's first column from the updated
  weights), prune column by column with the OBS update of the block's later columns, and apply the block's
  accumulated error to all later columns at once (lazy batch update).

Every step is vectorized over rows; the only Python loop is over columns. The solve works on W transposed
(columns of W are contiguous rows), and within a block it updates 16 columns eagerly and the rest of the block
lazily -- the same arithmetic as the reference, regrouped, so results agree to fp32 round-off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from pruners.masks import SparsityPattern, unstructured_threshold_mask
from pruners.reports import LayerReport, layer_report

BLOCKSIZE = 128
PERCDAMP = 0.01
DAMPING_RETRIES = 3  # after the first try, multiply the damping by 10 up to this many times
_EAGER_COLUMNS = 16  # width of the inner sub-blocks updated column by column


class CholeskyError(RuntimeError):
    """The damped Hessian (or its inverse) is not positive definite even after the damping retries."""


def accumulate_hessian(hessian: torch.Tensor, nsamples: int, inp: torch.Tensor) -> int:
    """Fold one batch of layer inputs (B, T, c) or (T, c) into `hessian` (c, c) fp32 in place; return the new count.

    H <- H * n/(n+B) + (2/(n+B)) * X^T X over the batch's B*T tokens: the reference's sqrt(2/n) scaling, with the
    running normalisation counting sequences, not tokens.
    """
    if inp.dim() == 2:
        inp = inp.unsqueeze(0)
    batch = inp.shape[0]
    tokens = inp.reshape(-1, inp.shape[-1]).float()  # (B*T, c)
    new_count = nsamples + batch
    hessian.addmm_(tokens.t(), tokens, beta=nsamples / new_count, alpha=2 / new_count)
    return new_count


def inverse_cholesky_upper(hessian: torch.Tensor, percdamp: float = PERCDAMP, retries: int = DAMPING_RETRIES
                           ) -> tuple[torch.Tensor, float]:
    """U with U^T U = (H + damp*I)^-1, U upper triangular; H (c, c) fp32 is damped in place.

    damp = percdamp * mean(diag H). If a Cholesky factorisation fails, the damping is multiplied by 10 and the
    factorisation retried, up to `retries` times. Returns U and the damping fraction actually used.
    Raises CholeskyError when every try fails.
    """
    mean_diag = torch.mean(torch.diagonal(hessian))
    diagonal = torch.diagonal(hessian)
    applied = 0.0
    for attempt in range(retries + 1):
        fraction = percdamp * 10**attempt
        diagonal.add_((fraction - applied) * mean_diag)
        applied = fraction
        lower, info = torch.linalg.cholesky_ex(hessian)
        if info.item() != 0:
            continue
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if info.item() == 0 and bool(torch.isfinite(upper).all()):
            return upper, fraction
    raise CholeskyError(
        f"the Hessian is not positive definite even with damping {applied:g} x mean(diag H)"
    )


@dataclass
class HessianFactor:
    """What the solve needs from a Hessian, computed once for every linear that shares it (q, k and v)."""

    upper: torch.Tensor  # (cols, cols) U with U^T U = (H + damp*I)^-1, H with dead diagonal entries set to 1
    damping: float  # the damping fraction used
    dead: torch.Tensor  # bool (cols,): inputs that were always zero (H_jj = 0); their weights are zeroed


def factor_hessian(hessian: torch.Tensor, percdamp: float = PERCDAMP, retries: int = DAMPING_RETRIES
                   ) -> HessianFactor:
    """The reference's preparation of H (cols, cols) fp32, which is not modified: dead inputs, damping, U."""
    hessian = hessian.to(torch.float32, copy=True)
    dead = torch.diagonal(hessian) == 0
    torch.diagonal(hessian)[dead] = 1
    upper, damping = inverse_cholesky_upper(hessian, percdamp, retries)
    return HessianFactor(upper, damping, dead)


def sparsegpt_prune_weight(weight: torch.Tensor, hessian: torch.Tensor | None, pattern: SparsityPattern, *,
                           blocksize: int = BLOCKSIZE, percdamp: float = PERCDAMP,
                           retries: int = DAMPING_RETRIES, fixed_mask: torch.Tensor | None = None,
                           factor: HessianFactor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune `weight` (rows, cols) given the Hessian of its inputs (cols, cols); neither argument is modified.

    fixed_mask: bool (rows, cols), True = prune: use this mask instead of choosing one (the OBS update of the
    kept weights is the same); `pattern` then only sets the block size.
    factor: `factor_hessian(hessian, percdamp, retries)` when already computed (then `hessian` may be None).

    Returns (new weight (rows, cols) fp32 with exact zeros, per-row OBS loss (rows,), damping fraction used).
    N:M groups are aligned to absolute columns; for an M that does not divide 128 the block size is rounded down
    to a multiple of M.
    """
    rows, cols = weight.shape
    if pattern.is_nm:
        blocksize = max(1, blocksize // pattern.m) * pattern.m
        eager = max(1, _EAGER_COLUMNS // pattern.m) * pattern.m
    else:
        eager = _EAGER_COLUMNS

    # W^T in fp32: row j holds input column j of W for every output row
    weight_t = torch.empty((cols, rows), dtype=torch.float32, device=weight.device).copy_(weight.t())
    if factor is None:
        factor = factor_hessian(hessian, percdamp, retries)
    weight_t[factor.dead] = 0
    upper, damping = factor.upper, factor.damping
    upper_diag = torch.diagonal(upper)

    losses = torch.zeros(rows, dtype=torch.float32, device=weight.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        block = weight_t[i1:i2]  # (count, rows) view: updated in place
        block_upper = upper[i1:i2, i1:i2]
        diag = upper_diag[i1:i2].reshape(-1, 1)
        if fixed_mask is not None:
            mask = fixed_mask[:, i1:i2].t().contiguous()
        elif pattern.is_nm:
            mask = torch.zeros(block.shape, dtype=torch.bool, device=block.device)
        else:  # one threshold over the whole block, from weights that already carry earlier blocks' updates
            mask = unstructured_threshold_mask(block**2 / diag**2, pattern.sparsity)
        errors = torch.empty_like(block)  # (count, rows): (w - q) / d per column
        for b0 in range(0, count, eager):
            b1 = min(b0 + eager, count)
            for i in range(b0, b1):
                choose_group = fixed_mask is None and pattern.is_nm and i % pattern.m == 0
                if choose_group:  # choose this group now, from the updated weights
                    group_score = block[i:i + pattern.m] ** 2 / diag[i:i + pattern.m] ** 2  # (m, rows)
                    lowest = torch.topk(group_score, pattern.n, dim=0, largest=False).indices
                    mask[i:i + pattern.m].scatter_(0, lowest, True)
                err = block[i] * mask[i] / upper_diag[i1 + i]  # (rows,): zero where the weight is kept
                errors[i] = err
                block[i:b1].addr_(block_upper[i, i:b1], err, alpha=-1)  # OBS update inside the sub-block
            if b1 < count:  # the sub-block's updates to the rest of the block
                block[b1:].addmm_(block_upper[b0:b1, b1:].t(), errors[b0:b1], alpha=-1)
        block.masked_fill_(mask, 0)  # pruned weights are exactly zero; kept ones hold their updated value
        losses += errors.square().sum(dim=0) / 2
        if i2 < cols:  # lazy update of every later column
            weight_t[i2:].addmm_(upper[i1:i2, i2:].t(), errors, alpha=-1)
    return weight_t.t(), losses, damping


class SparseGPTPruner:
    """Observes the inputs of one nn.Linear (`add_batch`, from a forward hook), then prunes it (`prune`)."""

    needs_calibration = True

    def __init__(self, layer: nn.Linear, name: str, blocksize: int = BLOCKSIZE, percdamp: float = PERCDAMP
                 ) -> None:
        self.layer = layer
        self.name = name
        self.blocksize = blocksize
        self.percdamp = percdamp
        self.hessian: torch.Tensor | None = None  # (in, in) fp32, allocated by the first add_batch
        self.nsamples = 0
        self.factor: dict[str, HessianFactor] = {}  # {"factor": ...} once computed; shared with share_statistics

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor) -> None:
        if self.hessian is None:
            cols = self.layer.in_features
            self.hessian = torch.zeros((cols, cols), dtype=torch.float32, device=inp.device)
        self.nsamples = accumulate_hessian(self.hessian, self.nsamples, inp)

    def share_statistics(self, other: SparseGPTPruner) -> None:
        """Use `other`'s Hessian (a linear fed the very same input tensor, e.g. k_proj beside q_proj)."""
        self.hessian, self.nsamples, self.factor = other.hessian, other.nsamples, other.factor

    @torch.no_grad()
    def prune(self, pattern: SparsityPattern) -> LayerReport:
        """Prune `self.layer` in place (weights cast back to the layer's dtype); frees the Hessian."""
        weight = self.layer.weight
        pattern.check_width(weight.shape[1], self.name)
        if self.nsamples == 0:
            raise RuntimeError(f"sparsegpt: no calibration input reached {self.name}")
        start = time.perf_counter()
        try:
            if "factor" not in self.factor:  # the first linear of those sharing this Hessian to be pruned
                self.factor["factor"] = factor_hessian(self.hessian, self.percdamp)
            new_weight, losses, damping = sparsegpt_prune_weight(
                weight, None, pattern, blocksize=self.blocksize, factor=self.factor["factor"]
            )
        except CholeskyError as error:
            raise CholeskyError(f"{self.name}: {error}; use more calibration samples or --ignore it") from None
        weight.copy_(new_weight)
        self.hessian = self.factor = None
        return layer_report(self.name, weight, time.perf_counter() - start, float(losses.sum()), damping)

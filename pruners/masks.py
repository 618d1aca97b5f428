"""Sparsity patterns and the mask-selection rules shared by every pruner.

A mask is a bool tensor shaped like the weight, True = prune (set to zero). Every rule here is a pure function
of a score matrix (rows = outputs, columns = inputs); the pruners differ only in the score they feed in and in
what they do with the weights afterwards. The rules copy the reference code (spec/pruners.md §1.4, §2.2, §2.5):

- `unstructured_threshold_mask`: one threshold per matrix, thresh = sort(score)[int(numel*s)], prune score <= thresh
  (so int(numel*s)+1 entries plus ties: SparseGPT per 128-column block, magnitude per matrix).
- `per_row_mask`: exactly int(c*s) per row, lowest first, ties broken by column (stable sort): Wanda.
- `nm_mask`: the N smallest of every M consecutive inputs of every row (topk): Wanda, magnitude, SparseGPT.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch


class PatternError(ValueError):
    """A sparsity pattern or sparsity that cannot be used; `str()` is one line naming the problem and the fix."""


@dataclass(frozen=True)
class SparsityPattern:
    """What to prune: a fraction of zeros, or N zeros in every M consecutive input weights of a row (N:M)."""

    sparsity: float  # fraction of zeros (N/M for N:M)
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if (self.n is None) != (self.m is None):
            raise PatternError(f"N:M needs both N and M, got n={self.n} m={self.m}")
        if self.is_nm:
            _check_nm(self.n, self.m)
            if not math.isclose(self.sparsity, self.n / self.m, rel_tol=0, abs_tol=1e-9):
                raise PatternError(_contradiction(self.sparsity, self.n, self.m))
        else:
            _check_sparsity(self.sparsity)

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    def check_width(self, in_features: int, layer_name: str) -> None:
        """Raise PatternError unless M divides `in_features` (N:M groups must tile every row)."""
        if self.is_nm and in_features % self.m != 0:
            raise PatternError(
                f"pattern {self} cannot tile layer {layer_name}: its {in_features} input features are not a "
                f"multiple of M={self.m}; exclude it with --ignore or pick an M that divides {in_features}"
            )


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str = "unstructured", sparsity: float | None = None) -> SparsityPattern:
    """Turn "unstructured" / "N:M" plus an optional sparsity into a checked SparsityPattern.

    Unstructured without a sparsity means 0.5 (the CLI default). N:M without a sparsity means N/M; any other
    sparsity with N:M is an error. Raises PatternError with a one-line message.
    """
    if not isinstance(pattern, str):
        raise PatternError(
            f"pattern {pattern!r} is not text: use 'unstructured' or N:M such as \"2:4\" (quote it in YAML)"
        )
    text = pattern.strip().lower()
    if text == "unstructured":
        return SparsityPattern(0.5 if sparsity is None else _as_sparsity(sparsity))
    match = _NM.match(text)
    if match is None:
        raise PatternError(f"pattern {pattern!r} is not recognised: use 'unstructured' or N:M such as 2:4 or 4:8")
    n, m = int(match.group(1)), int(match.group(2))
    _check_nm(n, m)
    if sparsity is not None and not math.isclose(_as_sparsity(sparsity), n / m, rel_tol=0, abs_tol=1e-9):
        raise PatternError(_contradiction(sparsity, n, m))
    return SparsityPattern(n / m, n, m)


def _as_sparsity(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PatternError(f"sparsity {value!r} is not a number: use a value in (0, 1), e.g. 0.5")
    _check_sparsity(float(value))
    return float(value)


def _check_sparsity(value: float) -> None:
    if not (0.0 < value < 1.0):  # also rejects NaN
        raise PatternError(f"sparsity {value} is out of range: use a value in (0, 1)")


def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise PatternError(f"N:M {n}:{m} is invalid: need 0 < N < M (e.g. 2:4)")


def _contradiction(sparsity: float, n: int, m: int) -> str:
    return f"--sparsity {sparsity} contradicts pattern {n}:{m} (= {n / m:g}): omit --sparsity or set it to {n / m:g}"


# ---------------------------------------------------------------------------------------------------------------
# mask selection: score (rows, cols) in, bool mask (rows, cols) out, True = prune


def unstructured_threshold_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune every entry with score <= the int(numel*sparsity)-th smallest score of the whole matrix.

    This is the reference `<=` rule: int(numel*s)+1 zeros, more where scores tie at the threshold.
    """
    flat = score.reshape(-1)
    k = int(flat.numel() * sparsity)  # index into the ascending sort, as the reference computes it
    return score <= kth_smallest(flat, k)


def kth_smallest(values: torch.Tensor, k: int, dim: int = 0) -> torch.Tensor:
    """sort(values, dim)[k] along `dim` (0-based k) without a full sort; `dim` removed from the shape.

    On CPU numpy's introselect is ~20x faster than torch.kthvalue; bfloat16 is widened to float32 first
    (exact and order-preserving).
    """
    if values.device.type != "cpu":
        return torch.kthvalue(values, k + 1, dim=dim).values
    values = values.detach()
    array = (values.float() if values.dtype == torch.bfloat16 else values).numpy()
    return torch.from_numpy(np.asarray(np.take(np.partition(array, k, axis=dim), k, axis=dim)))


def per_row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune exactly int(cols*sparsity) entries per row: the lowest scores, ties broken by column.

    The same mask as taking the first int(cols*sparsity) indices of a stable ascending sort of each row (the
    reference), found with a selection instead of a sort: everything below the row's k-th smallest value, then
    as many of the entries equal to it as there is room for, leftmost first.
    """
    rows, cols = score.shape
    count = int(cols * sparsity)
    if count == 0:
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    kth = kth_smallest(score, count - 1, dim=1).reshape(rows, 1)
    below = score < kth
    tied = score == kth
    room = count - below.sum(dim=1, keepdim=True)  # >= 1, and <= the number of ties in the row
    crowded = (tied.sum(dim=1, keepdim=True) > room).reshape(-1).nonzero().reshape(-1)
    if crowded.numel():  # keep only the leftmost `room` ties in those rows
        some = tied[crowded]
        tied[crowded] = some & (torch.cumsum(some, dim=1, dtype=torch.int32) <= room[crowded])
    return below | tied


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the n lowest scores in every group of m consecutive columns of every row (m must divide cols)."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    lowest = torch.topk(groups, n, dim=-1, largest=False).indices  # (rows, cols/m, n)
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=score.device).scatter_(-1, lowest, True)
    return mask.reshape(rows, cols)

"""The papers' reference pruning solvers, transcribed (spec/pruners.md §1.2-1.4 and §2.1-2.2), in fp32.

What spp's pruners are checked against: tests/pruners/ compares pruners/wanda.py and pruners/sparsegpt.py with these
on random layers, and benchmarks/real_layer_check.py compares spp's and llm-compressor's block-0 linears of a real
model with them. They are written as the reference repositories write them (one sequence per statistics update,
column by column), not for speed.
"""

from __future__ import annotations

import math

import torch


def reference_hessian(inputs):
    cols = inputs.shape[-1]
    hessian, nsamples = torch.zeros(cols, cols), 0
    for sample in inputs:
        inp = sample.reshape(-1, cols).t()
        hessian *= nsamples / (nsamples + 1)
        nsamples += 1
        inp = math.sqrt(2 / nsamples) * inp.float()
        hessian += inp.matmul(inp.t())
    return hessian


def reference_fasterprune(weight, hessian, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """SparseGPT's `fasterprune`, column by column, as the reference repository writes it."""
    W = weight.clone().float()
    H = hessian.clone()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Losses = torch.zeros(rows)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        Losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, Losses


def reference_wanda_variant(W_metric, sparsity_ratio):
    def return_given_alpha(alpha, sort_res, W_metric, tmp_metric, sum_before):
        thres_cumsum = sum_before * alpha
        sort_mask = tmp_metric <= thres_cumsum.reshape((-1, 1))
        thres = torch.gather(sort_res[0], dim=1, index=sort_mask.sum(dim=1, keepdims=True) - 1)
        W_mask = W_metric <= thres
        cur_sparsity = (W_mask == True).sum() / W_mask.numel()  # noqa: E712 (transcribed)
        return W_mask, cur_sparsity

    sort_res = torch.sort(W_metric, dim=-1, stable=True)
    tmp_metric = torch.cumsum(sort_res[0], dim=1)
    sum_before = W_metric.sum(dim=1)
    alpha, alpha_hist = 0.4, [0.0, 0.8]
    W_mask, cur_sparsity = return_given_alpha(alpha, sort_res, W_metric, tmp_metric, sum_before)
    while (torch.abs(cur_sparsity - sparsity_ratio) > 0.001) and (alpha_hist[1] - alpha_hist[0] >= 0.001):
        if cur_sparsity > sparsity_ratio:
            alpha_new = (alpha + alpha_hist[0]) / 2.0
            alpha_hist[1] = alpha
        else:
            alpha_new = (alpha + alpha_hist[1]) / 2.0
            alpha_hist[0] = alpha
        alpha = alpha_new
        W_mask, cur_sparsity = return_given_alpha(alpha, sort_res, W_metric, tmp_metric, sum_before)
    return W_mask


def reference_wanda(weight: torch.Tensor, inputs: torch.Tensor, nm: tuple[int, int] | None,
                    sparsity: float = 0.5) -> torch.Tensor:
    """Wanda's reference (lib/prune.py prune_wanda, default path): the pruned weight (rows, cols), fp32.

    inputs: (nsamples, seqlen, cols). scaler_row is WrappedGPT's running mean over sequences of sum_t x_tj^2; the
    metric |W_ij| * sqrt(scaler_row_j); per row the int(cols * sparsity) smallest (stable sort), or with nm = (n, m)
    per group of m the n smallest (topk)."""
    scaler_row, nsamples = torch.zeros(inputs.shape[-1]), 0
    for sample in inputs:  # WrappedGPT.add_batch, one sequence per call
        scaler_row *= nsamples / (nsamples + 1)
        nsamples += 1
        scaler_row += torch.norm(sample.float(), p=2, dim=0) ** 2 / nsamples
    metric = weight.float().abs() * torch.sqrt(scaler_row.reshape(1, -1))
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if nm is None:
        order = torch.sort(metric, dim=-1, stable=True)[1]
        mask.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], True)
    else:
        n, m = nm
        for start in range(0, metric.shape[1], m):
            group = metric[:, start:start + m]
            mask.scatter_(1, start + torch.topk(group, n, dim=1, largest=False)[1], True)
    pruned = weight.float().clone()
    pruned[mask] = 0
    return pruned

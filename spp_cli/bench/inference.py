"""Eval tokens/s (the forward `spp eval` runs for perplexity), and dense against 2:4 semi-structured speed of the
model's linear shapes and of a prefill where the GPU has the kernels (torch.sparse.to_sparse_semi_structured:
CUDA, compute capability 8.0 or newer). Every answer says plainly when there is no speed-up or no measurement.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from spp_cli.bench.measure import at_depth, fit_depths, release, timed
from spp_cli.errors import first_line

NEEDS_CUDA = "2:4 semi-structured kernels need a CUDA GPU (sm80+): not measured"


def _forward(model: nn.Module, ids: torch.Tensor):
    def run():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    return run


def bench_eval(base: nn.Module, ids: torch.Tensor, sizes: dict, device: str) -> dict:
    """Tokens per second of a no-grad forward over `ids` (batch, seqlen), measured and for the whole model."""
    model = copy.deepcopy(base).to(device)
    depth, real_depth, tokens = sizes["blocks"], sizes["real_depth"], ids.numel()
    seconds = {}
    for k in sorted({1, depth}):
        with at_depth(model, k):
            seconds[k] = timed(device, _forward(model, ids), sizes["steps"])
    del model
    release(device)
    fit = fit_depths(seconds[1], seconds[depth], depth)
    result = {"batch": list(ids.shape), "tokens_per_forward": tokens,
              "forward_seconds": {f"depth_{k}": s for k, s in seconds.items()},
              "tokens_per_second_measured": tokens / seconds[depth],
              "tokens_per_second_whole_model": tokens / fit.at(real_depth)}
    if fit.note:
        result["note"] = fit.note
    return result


def semi_structured_unavailable(device: str) -> str | None:
    """Why 2:4 semi-structured kernels cannot be measured here, or None when they can."""
    if not device.startswith("cuda"):
        return NEEDS_CUDA
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured: not measured"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"2:4 semi-structured kernels need compute capability 8.0+; this GPU is {major}.{minor}: not measured"
    return None


def _speed(dense: float, sparse: float) -> dict:
    speedup = dense / sparse
    verdict = f"{speedup:.2f}x faster" if speedup > 1.05 else f"no speed-up ({speedup:.2f}x of dense)"
    return {"dense_seconds": dense, "semi_structured_seconds": sparse, "speedup": speedup, "verdict": verdict}


def _linear_shapes(model: nn.Module) -> dict[tuple[int, int], str]:
    from pruners.blocks import prunable_linears

    shapes: dict[tuple[int, int], str] = {}
    for name, linear in prunable_linears(model).items():
        if isinstance(linear, nn.Linear):
            shapes.setdefault((linear.out_features, linear.in_features), name.rsplit(".", 1)[-1])
    return shapes


def bench_linears(model: nn.Module, tokens: int, device: str, steps: int) -> list[dict]:
    """Each distinct linear shape of the (2:4-pruned) model: y = x Wᵀ for x (tokens, in), dense W and 2:4 W."""
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for (out_features, in_features), example in sorted(_linear_shapes(model).items()):
        row = {"shape": [out_features, in_features], "example": example, "tokens": tokens}
        try:
            weight = next(m.weight for m in model.modules()
                          if isinstance(m, nn.Linear) and m.weight.shape == (out_features, in_features))
            x = torch.randn(tokens, in_features, device=device, dtype=weight.dtype)
            sparse = to_sparse_semi_structured(weight.detach())
            row.update(_speed(timed(device, partial(F.linear, x, weight), steps),
                              timed(device, partial(F.linear, x, sparse), steps)))
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {first_line(error)}"
        rows.append(row)
    return rows


def bench_prefill(base: nn.Module, ids: torch.Tensor, device: str, steps: int) -> dict:
    """One forward over `ids` with dense weights, then with every 2:4 linear weight semi-structured."""
    from torch.sparse import to_sparse_semi_structured

    from pruners.blocks import prunable_linears

    model = copy.deepcopy(base).to(device)
    try:
        dense = timed(device, _forward(model, ids), steps)
        for linear in prunable_linears(model).values():
            if isinstance(linear, nn.Linear):
                linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
        return {"batch": list(ids.shape), **_speed(dense, timed(device, _forward(model, ids), steps))}
    except Exception as error:
        return {"batch": list(ids.shape), "error": f"{type(error).__name__}: {first_line(error)}"}
    finally:
        del model
        release(device)


def bench_semi_structured(base: nn.Module, ids: torch.Tensor, device: str, steps: int) -> dict:
    """The 2:4 section: unavailable with its reason, or the linears, the prefill and one summary line."""
    reason = semi_structured_unavailable(device)
    if reason is not None:
        return {"available": False, "statement": reason}
    model = copy.deepcopy(base).to(device)
    try:
        linears = bench_linears(model, ids.numel(), device, steps)
    finally:
        del model
        release(device)
    prefill = bench_prefill(base, ids, device, steps)
    return {"available": True, "linears": linears, "prefill": prefill, "statement": _statement(linears, prefill)}


def _statement(linears: list[dict], prefill: dict) -> str:
    speedups = [row["speedup"] for row in linears if "speedup" in row]
    parts = []
    if speedups:
        parts.append(f"linears {min(speedups):.2f}x-{max(speedups):.2f}x of dense speed")
    parts.append(f"prefill {prefill['verdict']}" if "verdict" in prefill else
                 f"prefill not measured ({prefill.get('error', 'no result')})")
    if speedups and max(speedups) <= 1.05 and prefill.get("speedup", 0) <= 1.05:
        parts.append("no speed-up from 2:4 on this GPU at these shapes")
    return "2:4 semi-structured: " + "; ".join(parts)

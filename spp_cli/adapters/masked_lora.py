"""Masked LoRA: a LoRA update restricted to the pruned weight's support, in training and at merge.

    y = x Wᵀ + b + s · D(x) ((B A) ⊙ 1[W ≠ 0])ᵀ      W (out, in) frozen; A (r, in); B (out, r); s = lora_alpha / r
    merge: W ← W + s · (B A) ⊙ 1[W ≠ 0]              every zero of W stays exactly zero

Sources: SQFT (Muñoz et al., "SQFT: Low-cost Model Adaptation in Low-precision Sparse Foundation Models",
arXiv 2410.03750, its "SparsePEFT") and PERP's MaskLoRA (Zimmer et al., "PERP: Rethinking the Prune-Retrain
Paradigm in the Era of LLMs", arXiv 2312.15230). Defaults are those of lora.py (tloen/alpaca-lora finetune.py
at 8bb8579, lines 37-43: learning_rate 3e-4, lora_r 8, lora_alpha 16, lora_dropout 0.05). The masked-LoRA
sources agree on the learning rate: SQFT's "SQFT + SparsePEFT" command (IntelLabs/Hardware-Aware-Automated-
Machine-Learning at fc29bc7, SQFT/README.md line 202; SQFT/legacy/run_command/llama-3-8b/run.sh line 31 with
--sparse_adapter) trains with 3e-4 (r 32, alpha 64, dropout 0.1, cosine, 100 warm-up steps, 3 epochs); PERP's
main.py (ZIB-IOL/PERP at 0d4554b, lines 41-52) defaults to 5e-4 with r 16, alpha 32, dropout 0, 20 iterations of
a small retraining budget. Init as PEFT's LoRA: A kaiming-uniform (a=√5), B zero, so the adapted model starts
exactly at the pruned one. Unlike SPP's rescaling, the update has full rank on the support (spec/spp-method.md
§1.4).

Memory and time: no out × in tensor is kept for backward. Two custom autograd functions rebuild (B A) ⊙ M in
backward from A, B and the bool support (out × in bytes per layer, a buffer):
- with branch dropout (training, p > 0), `_MaskedBranch`: y = x Wᵀ + b + s·xd Δᵀ, PEFT's LoRA semantics
  (dropout on the branch input only). 2 GEMMs forward, 3 backward (∂x from W, ∂xd from Δ, P = gᵀ xd).
- without it (p = 0, or eval), `_MaskedFused`: y = x (W + s·Δ)ᵀ + b in one GEMM; ∂x = g (W + s·Δ), P = gᵀ x.
  The same function (sums in another order), and what recipes/compare-recovery.yaml runs.
Gradients (both): P' = s·P ⊙ M (out, in); ∂B = P' Aᵀ, ∂A = Bᵀ P'. scripts/bench_finetune.py measures both
forms against LoRA (scripts/bench_results/finetune_methods.json).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from spp_cli.adapters.base import Adapter, WrappedLinear, layers_by_suffix, resolve_targets, set_submodule
from spp_cli.adapters.lora import lora_fits
from spp_cli.adapters.spp import _compute_dtype


@dataclass
class MaskedLoRAConfig:
    r: int = 8
    lora_alpha: float = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r


def masked_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Δ = (B A) ⊙ M, fp32, (out, in): B (out, r), A (r, in), M the bool support (out, in)."""
    return (lora_B.float() @ lora_A.float()).mul_(support)


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """W + s·(B A) ⊙ 1[W ≠ 0] in fp32, cast back to W's dtype: masked LoRA's one merge formula (the layer's merge
    and the streaming merge, stages/merge_streaming.py). Every zero of W stays exactly zero."""
    return (weight.float() + scale * masked_delta(lora_A, lora_B, weight != 0)).to(weight.dtype)


def _lora_grads(p: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, support: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """∂A (r, in), ∂B (out, r) from P = gᵀ x (out, in), the gradient of the unscaled, unmasked update.

    P' = s·P ⊙ M ;  ∂A = Bᵀ P' ;  ∂B = P' Aᵀ     (P is overwritten)
    """
    masked = p.float().mul_(support).mul_(scale)
    return (lora_B.float().t() @ masked).to(lora_A.dtype), (masked @ lora_A.float().t()).to(lora_B.dtype)


class _MaskedBranch(torch.autograd.Function):
    """The branch s · xd Δᵀ (N, out) for xd (N, in), with Δ = (B A) ⊙ M rebuilt in backward instead of kept.

    Saved for backward: xd, A, B and the support (a buffer already resident), never an out×in float tensor.
    """

    @staticmethod
    def forward(ctx, xd, lora_A, lora_B, support, scale):
        dtype = _compute_dtype(lora_A)  # fp32 unless autocast is on (as F.linear on the fp32 Δ would run)
        delta = masked_delta(lora_A, lora_B, support).to(dtype)  # freed on return
        out = F.linear(xd.to(dtype), delta).mul_(scale)
        ctx.save_for_backward(xd, lora_A, lora_B, support)
        ctx.scale, ctx.dtype = scale, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xd, lora_A, lora_B, support = ctx.saved_tensors
        scale, dtype = ctx.scale, ctx.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (N, out)
        grad_xd = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            delta = masked_delta(lora_A, lora_B, support).mul_(scale).to(dtype)
            grad_xd = (g @ delta).view_as(xd).to(xd.dtype)
            del delta
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            p = g.t() @ xd.reshape(-1, xd.shape[-1]).to(dtype)  # (out, in)
            grad_A, grad_B = _lora_grads(p, lora_A, lora_B, support, scale)
        return grad_xd, grad_A, grad_B, None, None


def _merged_for_matmul(weight, lora_A, lora_B, support, scale, dtype):
    """W + s·Δ in `dtype` with one out×in fp32 temp."""
    return masked_delta(lora_A, lora_B, support).mul_(scale).add_(weight.float()).to(dtype)


class _MaskedFused(torch.autograd.Function):
    """x (W + s·Δ)ᵀ + b in one GEMM, the branch without dropout; the merged weight is rebuilt in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, support, scale):
        dtype = _compute_dtype(x)
        merged = _merged_for_matmul(weight, lora_A, lora_B, support, scale, dtype)
        ctx.save_for_backward(x, weight, lora_A, lora_B, support)
        ctx.scale, ctx.dtype = scale, dtype
        return F.linear(x.to(dtype), merged, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, support = ctx.saved_tensors
        scale, dtype = ctx.scale, ctx.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (N, out)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            merged = _merged_for_matmul(weight, lora_A, lora_B, support, scale, dtype)
            grad_x = (g @ merged).view_as(x).to(x.dtype)
            del merged
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            p = g.t() @ x.reshape(-1, x.shape[-1]).to(dtype)  # (out, in)
            grad_A, grad_B = _lora_grads(p, lora_A, lora_B, support, scale)
        return grad_x, None, None, grad_A, grad_B, None, None


class MaskedLoRALinear(WrappedLinear):
    """A frozen (pruned) nn.Linear plus a masked low-rank branch: lora_A (r, in), lora_B (out, r), fp32."""

    def __init__(self, base: nn.Linear, config: MaskedLoRAConfig):
        super().__init__()
        out_features, in_features = base.weight.shape
        self.base = base
        self.base.requires_grad_(False)
        self.scale = config.scale
        self.dropout_p = config.dropout
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # not saved with the model: it is the base weight's own support, rebuilt on every inject
        self.register_buffer("support", base.weight.detach() != 0, persistent=False)

    def delta(self) -> torch.Tensor:
        """(B A) ⊙ 1[W ≠ 0], fp32, (out, in)."""
        return masked_delta(self.lora_A, self.lora_B, self.support)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out). Dropout (training only) acts on the branch input, as in PEFT's LoRA."""
        weight, bias = self.base.weight, self.base.bias
        if self.dropout_p == 0 or not self.training:  # xd is x: one GEMM with the merged weight
            return _MaskedFused.apply(x, weight, bias, self.lora_A, self.lora_B, self.support, self.scale)
        result = self.base(x)
        xd = F.dropout(x, self.dropout_p, self.training)
        branch = _MaskedBranch.apply(xd.reshape(-1, xd.shape[-1]), self.lora_A, self.lora_B, self.support,
                                     self.scale)
        return result + branch.view(*result.shape[:-1], -1).to(result.dtype)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """The base nn.Linear with W ← W + s·(B A) ⊙ 1[W ≠ 0] written into it (fp32 math, W's dtype)."""
        weight = self.base.weight
        weight.copy_(merged_weight(weight, self.lora_A, self.lora_B, self.scale))
        return self.base


class MaskedLoRAAdapter(Adapter):
    """Masked LoRA behind the adapter interface (see the module docstring)."""

    name = "masked-lora"

    @classmethod
    def make_config(cls, options: dict) -> MaskedLoRAConfig:
        return MaskedLoRAConfig(r=options["lora_r"], lora_alpha=options["lora_alpha"], dropout=options["dropout"])

    @classmethod
    def config_class(cls) -> type:
        return MaskedLoRAConfig

    def inject(self, model: nn.Module, targets: list[str]) -> nn.Module:
        model.requires_grad_(False)
        names = resolve_targets(model, targets, (nn.Linear, MaskedLoRALinear))
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, MaskedLoRALinear):
                set_submodule(model, name, MaskedLoRALinear(module, self.config))
        for name in names:
            layer = model.get_submodule(name)
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)
        self.config.target_modules = names
        return model

    def file_layers(self, keys: list[str]) -> dict[str, dict[str, str]]:
        return layers_by_suffix(keys, {".lora_A": "A", ".lora_B": "B"})

    def merged_layer(self, layer: str, weight: torch.Tensor, bias: torch.Tensor | None,
                     tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return merged_weight(weight, tensors["A"], tensors["B"], self.config.scale), bias

    def fits(self, layer: str, weight: tuple[int, ...], shapes: dict[str, tuple[int, ...]]) -> bool:
        return lora_fits(weight, shapes)

    def merge(self, model: nn.Module) -> nn.Module:
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MaskedLoRALinear)]
        for name, layer in layers:
            set_submodule(model, name, layer.merged_linear())
        return model

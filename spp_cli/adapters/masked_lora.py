"""Masked LoRA: a LoRA update restricted to the pruned weight's support, in training and at merge.

    y = x Wᵀ + b + s · D(x) ((B A) ⊙ 1[W ≠ 0])ᵀ      W (out, in) frozen; A (r, in); B (out, r); s = lora_alpha / r
    merge: W ← W + s · (B A) ⊙ 1[W ≠ 0]              every zero of W stays exactly zero

Sources: SQFT (Muñoz et al., "SQFT: Low-cost Model Adaptation in Low-precision Sparse Foundation Models",
arXiv 2410.03750, its "SparsePEFT") and PERP's MaskLoRA (Zimmer et al., "PERP: Rethinking the Prune-Retrain
Paradigm in the Era of LLMs", arXiv 2312.15230). Both build on LoRA with LoRA's own hyper-parameters; the defaults
here are those of lora.py (alpaca-lora: r 8, alpha 16, dropout 0.05, lr 3e-4). Init as PEFT's LoRA: A
kaiming-uniform (a=√5), B zero, so the adapted model starts exactly at the pruned one. Unlike SPP's rescaling,
the update has full rank on the support (spec/spp-method.md §1.4).

Memory: the forward builds (B A) ⊙ mask, an out × in fp32 tensor kept for backward, plus a bool mask buffer per
layer (out × in bytes); scripts/bench_finetune.py measures both against LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from spp_cli.adapters.base import Adapter, WrappedLinear, resolve_targets, set_submodule


@dataclass
class MaskedLoRAConfig:
    r: int = 8
    lora_alpha: float = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r


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
        return (self.lora_B @ self.lora_A) * self.support

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        xd = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        delta = self.delta()
        return result + (F.linear(xd.to(delta.dtype), delta) * self.scale).to(result.dtype)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """The base nn.Linear with W ← W + s·(B A) ⊙ 1[W ≠ 0] written into it (fp32 math, W's dtype)."""
        weight = self.base.weight
        weight.copy_((weight.float() + self.scale * self.delta()).to(weight.dtype))
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

    def merge(self, model: nn.Module) -> nn.Module:
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MaskedLoRALinear)]
        for name, layer in layers:
            set_submodule(model, name, layer.merged_linear())
        return model

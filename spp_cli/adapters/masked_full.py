"""Masked full fine-tuning: every weight of the pruned linears trains, and the mask is enforced.

The quality upper bound of the zero-keeping methods (PERP, Zimmer et al., arXiv 2312.15230, retrains all the
pruned weights as its reference; so does SparseGPT's and Wanda's "sparse fine-tuning" follow-up work). Default
lr 2e-5: Stanford Alpaca's full fine-tuning recipe (Taori et al. 2023; tatsu-lab/stanford_alpaca at 761dc5b,
README.md lines 146-148: --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03, cosine schedule, 3 epochs).

How the zeros are kept: a gradient hook multiplies ∂L/∂W by 1[W ≠ 0] (so AdamW's moments stay zero there and
its update is exactly zero), and after every optimizer step W ← W ⊙ 1[W ≠ 0] is written again, so neither
decoupled weight decay nor any optimizer state can revive a zero. Nothing to merge: the trained weights are the
model's own. Memory: the trainable parameters are the full target weights (AdamW keeps two more copies, fp32);
the stage reports trainable_params and the peak memory.

Fused MoE experts (transformers 5: experts.gate_up_proj (E, 2I, H), down_proj (E, H, I); pruners/experts.py) train
the same way, the mask over the whole 3-D parameter, when every expert slice of it is a target (the default: all
experts are pruned); a parameter only partly targeted stays frozen, since training it would train its untargeted
experts too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from spp_cli.adapters.base import Adapter, fully_targeted_experts, resolve_targets, split_fused_experts

SUPPORT = "spp_support_"  # + the parameter's name: a non-persistent buffer, never in a saved state dict


def masked_weight(weight: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """W ⊙ 1[W_base ≠ 0] (`support`, in W's dtype): masked-full's merge formula (the streaming merge's,
    stages/merge_streaming.py; after_optimizer_step, which the in-memory merge ends with, computes it in place)."""
    return weight * support


@dataclass
class MaskedFullConfig:
    target_modules: list[str] = field(default_factory=list)


class MaskedFullAdapter(Adapter):
    name = "masked-full"
    adapts_fused_experts = True

    def __init__(self, config: MaskedFullConfig):
        super().__init__(config)
        self._trained: list[tuple[nn.Module, str]] = []  # (module, parameter name); the support is a buffer beside it
        self._hooks: list = []

    @classmethod
    def make_config(cls, options: dict) -> MaskedFullConfig:
        return MaskedFullConfig()

    @classmethod
    def config_class(cls) -> type:
        return MaskedFullConfig

    def inject(self, model: nn.Module, targets: list[str]) -> nn.Module:
        model.requires_grad_(False)
        linears, expert_slices = split_fused_experts(model, targets)
        names = resolve_targets(model, linears)
        for name in names:
            self._train_masked(model.get_submodule(name), "weight")
        for (owner, parameter), slices in fully_targeted_experts(model, expert_slices).items():
            self._train_masked(model.get_submodule(owner), parameter)
            names.extend(slices)
        self.config.target_modules = names
        return model

    def _train_masked(self, module: nn.Module, parameter: str) -> None:
        weight = getattr(module, parameter)
        module.register_buffer(SUPPORT + parameter, (weight.detach() != 0).to(weight.dtype), persistent=False)
        weight.requires_grad_(True)
        self._hooks.append(weight.register_hook(
            lambda grad, module=module, parameter=parameter: grad * getattr(module, SUPPORT + parameter)))
        self._trained.append((module, parameter))

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        for module, parameter in self._trained:  # masked_weight in place: no second copy of every target
            getattr(module, parameter).mul_(getattr(module, SUPPORT + parameter))

    def file_layers(self, keys: list[str]) -> dict[str, dict[str, str]]:
        """The trained weights themselves: `<linear>.weight`, or a fused experts parameter stored whole."""
        return {key.removesuffix(".weight"): {"weight": key} for key in keys}

    def merged_layer(self, layer: str, weight: torch.Tensor, bias: torch.Tensor | None,
                     tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The trained weight (cast to the base's dtype, as loading it into the model does) under the base's mask."""
        return masked_weight(tensors["weight"].to(weight.dtype), (weight != 0).to(weight.dtype)), bias

    def fits(self, layer: str, weight: tuple[int, ...], shapes: dict[str, tuple[int, ...]]) -> bool:
        """The trained weight has the base weight's shape."""
        return shapes.get("weight") == weight

    def merge(self, model: nn.Module) -> nn.Module:
        self.after_optimizer_step(model)
        for hook in self._hooks:
            hook.remove()
        for module, parameter in self._trained:
            delattr(module, SUPPORT + parameter)  # the plain module again
        self._hooks.clear()
        self._trained.clear()
        model.requires_grad_(False)
        return model

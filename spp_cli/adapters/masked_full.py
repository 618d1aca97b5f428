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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from spp_cli.adapters.base import Adapter, resolve_targets

SUPPORT = "spp_support"  # the non-persistent buffer name, never in a saved state dict


@dataclass
class MaskedFullConfig:
    target_modules: list[str] = field(default_factory=list)


class MaskedFullAdapter(Adapter):
    name = "masked-full"

    def __init__(self, config: MaskedFullConfig):
        super().__init__(config)
        self._layers: list[nn.Linear] = []  # each holds its support 1[W ≠ 0] as a buffer (moves with the model)
        self._hooks: list = []

    @classmethod
    def make_config(cls, options: dict) -> MaskedFullConfig:
        return MaskedFullConfig()

    @classmethod
    def config_class(cls) -> type:
        return MaskedFullConfig

    def inject(self, model: nn.Module, targets: list[str]) -> nn.Module:
        model.requires_grad_(False)
        names = resolve_targets(model, targets)
        for name in names:
            layer = model.get_submodule(name)
            layer.register_buffer(SUPPORT, (layer.weight.detach() != 0).to(layer.weight.dtype), persistent=False)
            layer.weight.requires_grad_(True)
            self._hooks.append(layer.weight.register_hook(lambda grad, layer=layer: grad * getattr(layer, SUPPORT)))
            self._layers.append(layer)
        self.config.target_modules = names
        return model

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        for layer in self._layers:
            layer.weight.mul_(getattr(layer, SUPPORT))

    def merge(self, model: nn.Module) -> nn.Module:
        self.after_optimizer_step(model)
        for hook in self._hooks:
            hook.remove()
        for layer in self._layers:
            delattr(layer, SUPPORT)  # the plain nn.Linear again
        self._hooks.clear()
        self._layers.clear()
        model.requires_grad_(False)
        return model

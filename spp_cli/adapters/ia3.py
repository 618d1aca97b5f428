"""(IA)³ on the pruned linears, with PEFT's own implementation and merge: learned scaling vectors.

Source: Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
(T-Few, arXiv 2205.05638), whose (IA)³ recipe trains the vectors with lr 3e-3 (r-three/t-few at 114dece,
configs/ia3.json line 9: "lr": 3e-3, 1000 steps; its optimizer is Adafactor with linear decay, 6% warm-up and no
weight decay, src/utils/Config.py lines 53-58, where spp trains every method with AdamW); PEFT's IA3Config. The
vectors start at 1 (the adapted model is the pruned one exactly). A feed-forward layer (PEFT's mapping for the
architecture, e.g. LLaMA's down_proj) scales its input, y = W (x ⊙ l), every other layer its output,
y = (W x) ⊙ l; PEFT's merge writes W ⊙ l (columns or rows), so a zero of W stays zero.
The stage verifies the zero set after the merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from spp_cli.adapters.lora import PeftAdapter


@dataclass
class IA3AdapterConfig:
    target_modules: list[str] = field(default_factory=list)
    feedforward_modules: list[str] = field(default_factory=list)


def feedforward_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The targets PEFT treats as feed-forward for this architecture (input scaling); none if it has no mapping."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as MAPPING

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    suffixes = tuple(MAPPING.get(model_type, ()))
    return [name for name in targets if suffixes and name.rsplit(".", 1)[-1] in suffixes]


def merged_layer(weight: torch.Tensor, bias: torch.Tensor | None, ia3_l: torch.Tensor,
                 feedforward: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W ⊙ l, b ⊙ l) exactly as PEFT's IA3 Linear.merge computes them: l (1, in) scales W's columns for a
    feed-forward layer (its bias stays), else l (out, 1) scales W's rows and the bias; each result in its input's
    dtype. IA3's one merge formula (IA3Adapter.merge and the streaming merge)."""
    merged = torch.mul(weight, ia3_l).to(weight.dtype)
    if not feedforward and bias is not None:
        bias = torch.mul(bias, ia3_l.reshape(bias.shape)).to(bias.dtype)
    return merged, bias


class IA3Adapter(PeftAdapter):
    """PEFT IA3: one vector per target (in_features for feed-forward layers, else out_features)."""

    name = "ia3"
    FILE_ROLES = {".ia3_l": "l"}

    def module_tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"l": module.ia3_l["default"].data}

    def merged_layer(self, layer: str, weight: torch.Tensor, bias: torch.Tensor | None,
                     tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return merged_layer(weight, bias, tensors["l"], layer in self.config.feedforward_modules)

    def fits(self, layer: str, weight: tuple[int, ...], shapes: dict[str, tuple[int, ...]]) -> bool:
        """l (1, in) for a feed-forward layer, else (out, 1), of a W (out, in) (PEFT's IA3 Linear)."""
        if len(weight) != 2:
            return False
        feedforward = layer in self.config.feedforward_modules
        return shapes.get("l") == ((1, weight[1]) if feedforward else (weight[0], 1))

    @classmethod
    def make_config(cls, options: dict) -> IA3AdapterConfig:
        return IA3AdapterConfig()

    @classmethod
    def config_from_peft(cls, peft_config) -> IA3AdapterConfig:
        return IA3AdapterConfig(sorted(peft_config.target_modules), sorted(peft_config.feedforward_modules or []))

    def peft_config(self, targets: list[str], model: nn.Module):
        from peft import IA3Config

        self.config.feedforward_modules = feedforward_targets(model, targets)
        self._peft_config = IA3Config(target_modules=targets, feedforward_modules=self.config.feedforward_modules,
                                      init_ia3_weights=True, task_type="CAUSAL_LM")
        return self._peft_config

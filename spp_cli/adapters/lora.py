"""The LoRA baseline: PEFT's own LoRA on the pruned linears; dense after the merge (its zeros are lost).

Source: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685), with the defaults of
tloen/alpaca-lora's finetune.py (commit 8bb8579, the base of SPP's training script, spec/spp-method.md §0):
r 8, lora_alpha 16, lora_dropout 0.05, AdamW lr 3e-4. `PeftAdapter` is shared with ia3.py: PEFT injects, trains
and merges (merge_and_unload); the files are PEFT's own (save_pretrained), plus the base's zero hashes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spp_cli.adapters.base import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    Adapter,
    base_weight,
    check_base_zeros,
    json_safe,
    layers_by_suffix,
    read_adapter_config,
    target_zeros,
)
from spp_cli.errors import BadInput
from spp_cli.io.atomic import atomic_dir

PEFT_PREFIX = "base_model.model."  # of every key PEFT writes in adapter_model.safetensors


class PeftAdapter(Adapter):
    """A method PEFT implements: `peft_config(targets)` and the merge formula are the difference between LoRA and
    IA3."""

    FILE_ROLES: dict[str, str] = {}  # suffix of a layer's key in adapter_model.safetensors -> role

    def peft_config(self, targets: list[str], model: nn.Module):
        raise NotImplementedError

    def inject(self, model: nn.Module, targets: list[str]) -> nn.Module:
        from peft import get_peft_model

        self.config.target_modules = list(targets)
        return get_peft_model(model, self.peft_config(list(targets), model))

    def merge(self, model: nn.Module) -> nn.Module:
        """PEFT's merge_and_unload, with the method's merged_layer as the formula (the streaming merge's too)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in model.get_base_model().named_modules():
            if isinstance(module, BaseTunerLayer):
                base = module.get_base_layer()
                bias = None if base.bias is None else base.bias.data
                weight, bias = self.merged_layer(name, base.weight.data, bias, self.module_tensors(module))
                base.weight.data = weight
                if bias is not None:
                    base.bias.data = bias
        return model.unload()

    def module_tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The layer's adapter tensors by role (those file_layers names in the file), from PEFT's layer."""
        raise NotImplementedError

    def file_layers(self, keys: list[str]) -> dict[str, dict[str, str]]:
        """PEFT's file keys are `base_model.model.<layer>.<tensor>`."""
        layers = layers_by_suffix(keys, self.FILE_ROLES)
        return {layer.removeprefix(PEFT_PREFIX): roles for layer, roles in layers.items()}

    def record(self) -> dict:
        """PEFT's own config (to_dict) when injected, so the record is the config PEFT actually ran."""
        peft_config = getattr(self, "_peft_config", None)
        if peft_config is None:
            return super().record()
        # where the base lives is not part of the config (spp.json's hash must not depend on a location)
        return {key: value for key, value in json_safe(peft_config.to_dict()).items()
                if key not in ("base_model_name_or_path", "revision")}

    def save(self, model: nn.Module, adapter_dir: str | os.PathLike, *, base_path: str,
             base_manifest_sha256: str | None, known_zeros: dict[str, str] | None = None) -> None:
        modules = dict(model.get_base_model().named_modules())
        weight = lambda name: base_weight(modules[name])  # noqa: E731
        zeros = target_zeros(list(self.config.target_modules), known_zeros, weight, lambda name: weight(name).is_meta)
        model.peft_config["default"].base_model_name_or_path = base_path

        with atomic_dir(adapter_dir) as staging:
            model.save_pretrained(str(staging))
            config_path = staging / ADAPTER_CONFIG_NAME
            config = json.loads(config_path.read_text())
            # extra keys: PEFT ignores them on load (with a warning); spp's load reads them to refuse a wrong base
            config.update(base_manifest_sha256=base_manifest_sha256, base_zeros_sha256=zeros)
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, model: nn.Module, adapter_dir: str | os.PathLike) -> tuple[Adapter, nn.Module]:
        from peft import get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        record = read_adapter_config(adapter_dir)
        check_base_zeros(model, record, adapter_dir)
        weights = Path(adapter_dir) / ADAPTER_WEIGHTS_NAME
        if not weights.is_file():
            raise BadInput(f"{weights} not found: the adapter directory is incomplete")
        adapter = cls.from_file_record(record)
        adapted = get_peft_model(model, adapter._peft_config)
        result = set_peft_model_state_dict(adapted, load_file(str(weights)))
        if getattr(result, "unexpected_keys", None):
            raise BadInput(f"{weights} holds tensors this base lacks ({result.unexpected_keys[0]}): use its base")
        return adapter, adapted

    @classmethod
    def from_file_record(cls, record: dict) -> Adapter:
        """From PEFT's own config (spp's base_* keys left out), which record() then reports."""
        from peft import PeftConfig

        peft_config = PeftConfig.from_peft_type(**{k: v for k, v in record.items() if not k.startswith("base_")
                                                   or k == "base_model_name_or_path"})
        adapter = cls(cls.config_from_peft(peft_config))
        adapter._peft_config = peft_config
        return adapter

    @classmethod
    def config_from_peft(cls, peft_config) -> Any:
        raise NotImplementedError


@dataclass
class LoRAConfig:
    """LoRA's options as spp reads them; once injected, the record is PEFT's LoraConfig (PeftAdapter.record)."""

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + s·B A exactly as PEFT's LoraLayer.merge computes it (get_delta_weight, then an in-place add in W's
    dtype): B A in the adapter's dtype, in fp32 for a half-precision adapter on the CPU. W (out, in), A (r, in),
    B (out, r). LoRA's one merge formula (LoRAAdapter.merge and the streaming merge)."""
    cast_to_fp32 = lora_B.device.type == "cpu" and lora_B.dtype in (torch.float16, torch.bfloat16)
    delta = (lora_B.float() @ lora_A.float() if cast_to_fp32 else lora_B @ lora_A) * scaling
    merged = weight.clone()
    merged += delta.to(lora_B.dtype) if cast_to_fp32 else delta
    return merged


def lora_fits(weight: tuple[int, ...], shapes: dict[str, tuple[int, ...]]) -> bool:
    """W (out, in), A (r, in), B (out, r): LoRA's and masked LoRA's tensors fit their weight."""
    lora_A, lora_B = shapes.get("A"), shapes.get("B")
    if lora_A is None or lora_B is None or len(weight) != 2 or len(lora_A) != 2:
        return False
    return lora_A[1] == weight[1] and lora_B == (weight[0], lora_A[0])


class LoRAAdapter(PeftAdapter):
    """PEFT LoRA (dense after the merge). Defaults: r 8, alpha 16, dropout 0.05, lr 3e-4 (alpaca-lora)."""

    name = "lora"
    FILE_ROLES = {".lora_A.weight": "A", ".lora_B.weight": "B"}

    @property
    def scaling(self) -> float:
        """PEFT's LoraLayer.scaling: lora_alpha / r (/ sqrt(r) with rsLoRA, which spp never sets)."""
        peft_config = getattr(self, "_peft_config", None)
        if peft_config is not None and peft_config.use_rslora:
            return peft_config.lora_alpha / math.sqrt(peft_config.r)
        return self.config.lora_alpha / self.config.r

    def module_tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"A": module.lora_A["default"].weight.data, "B": module.lora_B["default"].weight.data}

    def merged_layer(self, layer: str, weight: torch.Tensor, bias: torch.Tensor | None,
                     tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return merged_weight(weight, tensors["A"], tensors["B"], self.scaling), bias

    def fits(self, layer: str, weight: tuple[int, ...], shapes: dict[str, tuple[int, ...]]) -> bool:
        return lora_fits(weight, shapes)

    @classmethod
    def make_config(cls, options: dict) -> LoRAConfig:
        return LoRAConfig(r=options["lora_r"], lora_alpha=options["lora_alpha"], lora_dropout=options["dropout"])

    @classmethod
    def config_from_peft(cls, peft_config) -> LoRAConfig:
        return LoRAConfig(peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout,
                          sorted(peft_config.target_modules))

    def peft_config(self, targets: list[str], model: nn.Module):
        from peft import LoraConfig

        self._peft_config = LoraConfig(r=self.config.r, lora_alpha=self.config.lora_alpha,
                                       lora_dropout=self.config.lora_dropout, target_modules=targets, bias="none",
                                       task_type="CAUSAL_LM")
        return self._peft_config

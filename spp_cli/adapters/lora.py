"""The LoRA baseline: PEFT's own LoRA on the pruned linears; dense after the merge (its zeros are lost).

Source: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685), with the defaults of
tloen/alpaca-lora's finetune.py (commit 8bb8579, the base of SPP's training script, spec/spp-method.md §0):
r 8, lora_alpha 16, lora_dropout 0.05, AdamW lr 3e-4. `PeftAdapter` is shared with ia3.py: PEFT injects, trains
and merges (merge_and_unload); the files are PEFT's own (save_pretrained), plus the base's zero hashes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from spp_cli.adapters.base import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    Adapter,
    base_weight,
    check_base_zeros,
    json_safe,
    read_adapter_config,
)
from spp_cli.errors import BadInput
from spp_cli.io.atomic import atomic_dir


class PeftAdapter(Adapter):
    """A method PEFT implements: `peft_config(targets)` is the whole difference between LoRA and IA3."""

    def peft_config(self, targets: list[str], model: nn.Module):
        raise NotImplementedError

    def inject(self, model: nn.Module, targets: list[str]) -> nn.Module:
        from peft import get_peft_model

        self.config.target_modules = list(targets)
        return get_peft_model(model, self.peft_config(list(targets), model))

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()

    def record(self) -> dict:
        """PEFT's own config (to_dict) when injected, so the record is the config PEFT actually ran."""
        peft_config = getattr(self, "_peft_config", None)
        if peft_config is None:
            return super().record()
        # where the base lives is not part of the config (spp.json's hash must not depend on a location)
        return {key: value for key, value in json_safe(peft_config.to_dict()).items()
                if key not in ("base_model_name_or_path", "revision")}

    def save(self, model: nn.Module, adapter_dir: str | os.PathLike, *, base_path: str,
             base_manifest_sha256: str | None) -> None:
        from spp_cli.io.manifest import zeros_sha256

        modules = dict(model.get_base_model().named_modules())
        zeros = {name: zeros_sha256(base_weight(modules[name])) for name in self.config.target_modules}
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
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        record = read_adapter_config(adapter_dir)
        check_base_zeros(model, record, adapter_dir)
        weights = Path(adapter_dir) / ADAPTER_WEIGHTS_NAME
        if not weights.is_file():
            raise BadInput(f"{weights} not found: the adapter directory is incomplete")
        peft_config = PeftConfig.from_peft_type(**{k: v for k, v in record.items() if not k.startswith("base_")
                                                   or k == "base_model_name_or_path"})
        adapter = cls(cls.config_from_peft(peft_config))
        adapter._peft_config = peft_config
        adapted = get_peft_model(model, peft_config)
        result = set_peft_model_state_dict(adapted, load_file(str(weights)))
        if getattr(result, "unexpected_keys", None):
            raise BadInput(f"{weights} holds tensors this base lacks ({result.unexpected_keys[0]}): use its base")
        return adapter, adapted

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


class LoRAAdapter(PeftAdapter):
    """PEFT LoRA (dense after merge_and_unload). Defaults: r 8, alpha 16, dropout 0.05, lr 3e-4 (alpaca-lora)."""

    name = "lora"

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

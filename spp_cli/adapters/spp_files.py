"""SPP adapter files in PEFT's layout: adapter_dir/{adapter_config.json, adapter_model.safetensors}.

Fused MoE experts (adapters/spp_experts.py) are targets by their slice names (`<experts>.<e>.gate_proj`); their α/β
are stored per fused parameter (`<experts>.gate_up_proj.spp_alpha` (E, 2G, H), `...spp_beta` (E, 2I)).

Saving is atomic (temp dir + rename) and records the base's manifest sha and the zeros_sha256 of every target;
loading injects SPP layers (adapters/spp.py) and refuses a base whose zero masks differ from the trained-on one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from spp_cli.adapters.base import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    resolve_targets,
    split_fused_experts,
    target_weight,
)
from spp_cli.adapters.base import read_adapter_config as read_any_adapter_config
from spp_cli.adapters.spp import SPPConfig, SPPLinear, inject_spp, spp_layers
from spp_cli.adapters.spp_experts import expert_state_dict, inject_spp_experts, load_expert_state
from spp_cli.atomic import atomic_dir
from spp_cli.errors import BadInput


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module>.spp_alpha": (G, in), "<module>.spp_beta": (out,)} as contiguous CPU tensors."""
    state = {}
    for name, layer in spp_layers(model).items():
        state[f"{name}.spp_alpha"] = layer.spp_alpha.detach().cpu().contiguous().clone()
        state[f"{name}.spp_beta"] = layer.spp_beta.detach().cpu().contiguous().clone()
    return state


def save_spp_adapter(model: nn.Module, adapter_dir: str | os.PathLike, config: SPPConfig, *, base_path: str,
                     base_manifest_sha256: str | None) -> None:
    """Write adapter_dir/{adapter_config.json, adapter_model.safetensors} atomically (spp_cli/atomic.py).

    The config records the base's manifest sha and the zeros_sha256 of every target, so a load onto a base
    with another mask is refused. Call on rank 0 with the full (unwrapped) model.
    """
    from safetensors.torch import save_file

    from spp_cli.manifest import zeros_sha256

    layers = spp_layers(model)
    expert_state = expert_state_dict(model)
    if not layers and not expert_state:
        raise BadInput("the model has no SPP layers to save: inject (or train) an adapter first")
    targets = list(layers) + [name for name in config.target_modules if name not in layers]
    adapter_config = {
        "peft_type": "SPP",
        "groups": config.groups,
        "scale": config.scale,
        "lora_alpha": config.lora_alpha,
        "r": config.r,
        "dropout": config.dropout,
        "target_modules": targets,
        "forward": config.forward,
        # the experts' W' is one parametrization (spp_experts.py): SPP's "fused" form, without the branch dropout
        **({"experts_forward": "fused, no branch dropout"} if expert_state else {}),
        "base_model_name_or_path": base_path,
        "base_manifest_sha256": base_manifest_sha256,
        "base_zeros_sha256": {name: zeros_sha256(target_weight(model, name)) for name in targets},
    }
    state = {**adapter_state_dict(model), **expert_state}

    with atomic_dir(adapter_dir) as staging:
        (staging / ADAPTER_CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n")
        save_file(state, str(staging / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """The adapter_config.json of an SPP adapter directory (BadInput when missing or not SPP)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG_NAME
    data = read_any_adapter_config(adapter_dir)
    if data.get("peft_type") != "SPP":
        raise BadInput(f"{path}: peft_type is {data.get('peft_type')!r}, not 'SPP': this is not an SPP adapter")
    return data


def load_spp_adapter(model: nn.Module, adapter_dir: str | os.PathLike, *,
                     base_manifest_sha256: str | None = None) -> SPPConfig:
    """Inject SPP layers into `model` and load the adapter's α/β; returns the adapter's SPPConfig.

    Refuses (BadInput) a base whose target zero masks (zeros_sha256) differ from those the adapter was trained
    on, or whose manifest sha differs when both are known. Checks happen before the model is modified.
    """
    from safetensors.torch import load_file

    from spp_cli.manifest import zeros_sha256

    data = read_adapter_config(adapter_dir)
    recorded_manifest = data.get("base_manifest_sha256")
    if base_manifest_sha256 and recorded_manifest and base_manifest_sha256 != recorded_manifest:
        raise BadInput(f"adapter {adapter_dir} was trained on base manifest {recorded_manifest[:12]}..., this base "
                       f"is {base_manifest_sha256[:12]}...: load it onto {data.get('base_model_name_or_path')}")
    linears, expert_slices = split_fused_experts(model, data["target_modules"])
    targets = resolve_targets(model, linears, (nn.Linear, SPPLinear))
    for name in targets + expert_slices:
        expected = data.get("base_zeros_sha256", {}).get(name)
        if expected is not None and zeros_sha256(target_weight(model, name)) != expected:
            raise BadInput(f"adapter {adapter_dir} does not fit this base: layer {name} has a different zero mask; "
                           f"load it onto the model it was trained on ({data.get('base_model_name_or_path')})")
    config = SPPConfig(groups=data["groups"], lora_alpha=data["lora_alpha"], r=data["r"], dropout=data["dropout"],
                       target_modules=list(targets), forward=data.get("forward", "auto"))
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS_NAME
    if not weights_path.is_file():
        raise BadInput(f"{weights_path} not found: the adapter directory is incomplete")
    state = load_file(str(weights_path))
    layers = inject_spp(model, targets, config)
    config.target_modules += inject_spp_experts(model, expert_slices, config.groups, config.scale)
    load_expert_state(model, state, str(weights_path))
    with torch.no_grad():
        for name, layer in layers.items():
            for key, parameter in ((f"{name}.spp_alpha", layer.spp_alpha), (f"{name}.spp_beta", layer.spp_beta)):
                if key not in state or state[key].shape != parameter.shape:
                    raise BadInput(f"{weights_path}: {key} is missing or has the wrong shape: the adapter is damaged")
                parameter.copy_(state[key])
    return config

"""Recovery methods behind one interface (adapters/base.py): the registry, name -> adapter class.

Torch-free on purpose: the recipe schema and `spp --help` read METHODS and each method's options from here, and
the adapter classes (which import torch) are imported only when `adapter_class(name)` is first asked.

    adapter = adapter_class(options.method).from_options(options)   # options: a FinetuneStage
    model = adapter.inject(model, targets)                            # train model ...
    plain = adapter.merge(model)                                      # nn.Linear modules again

A method reads the general fine-tune options (lr, batch_size, ...) and its own ones, listed in `options` below
(schema field -> default); giving a method an option it does not read is bad input (misplaced_option, which
the recipe schema's FinetuneStage.check reports).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Method:
    """What the registry knows of a recovery method without importing it."""

    name: str
    implementation: str  # "module:Class", imported on first use
    peft_type: str  # adapter_config.json's "peft_type": how `spp merge` recognises the method's files
    keeps_zeros: bool  # whether the merged model keeps every zero of the parent (checked after the merge)
    default_lr: float  # the method source's learning rate (cited in the implementation's docstring)
    options: dict[str, Any] = field(default_factory=dict)  # FinetuneStage field -> this method's default


REGISTRY: dict[str, Method] = {
    method.name: method
    for method in (
        Method("spp", "spp_cli.adapters.spp:SPPAdapter", "SPP", True, 4e-3,
               {"groups": 16, "dropout": 0.05, "forward": "auto", "lora_r": 8, "lora_alpha": 16}),
        Method("lora", "spp_cli.adapters.lora:LoRAAdapter", "LORA", False, 3e-4,
               {"lora_r": 8, "lora_alpha": 16, "dropout": 0.05}),
        Method("masked-lora", "spp_cli.adapters.masked_lora:MaskedLoRAAdapter", "MASKED_LORA", True, 3e-4,
               {"lora_r": 8, "lora_alpha": 16, "dropout": 0.05}),
        Method("ia3", "spp_cli.adapters.ia3:IA3Adapter", "IA3", True, 3e-3),
        Method("masked-full", "spp_cli.adapters.masked_full:MaskedFullAdapter", "MASKED_FULL", True, 2e-5),
    )
}
METHODS: tuple[str, ...] = tuple(REGISTRY)
METHOD_OPTIONS: tuple[str, ...] = tuple(dict.fromkeys(key for m in REGISTRY.values() for key in m.options))


def method_named(name: str) -> Method:
    from spp_cli.errors import BadInput

    if name not in REGISTRY:
        raise BadInput(f"--method {name!r} is unknown: use one of {', '.join(METHODS)}")
    return REGISTRY[name]


def method_for_peft_type(peft_type: str | None) -> Method:
    from spp_cli.errors import BadInput

    for method in REGISTRY.values():
        if method.peft_type == peft_type:
            return method
    raise BadInput(f"adapter peft_type {peft_type!r} is not one spp writes: point at an adapter/ folder of "
                   f"`spp finetune --no-merge` (one of {', '.join(m.peft_type for m in REGISTRY.values())})")


def adapter_class(name: str) -> type:
    """The adapter class of method `name` (imports torch); BadInput for an unknown name."""
    method = method_named(name)
    module_name, class_name = method.implementation.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def misplaced_option(method: str, options: dict[str, Any]) -> str | None:
    """The first method-specific option set (not None) in `options` that `method` does not read, else None."""
    reads = method_named(method).options
    for key in METHOD_OPTIONS:
        if options.get(key) is not None and key not in reads:
            return key
    return None


def resolved_method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method's own options with None filled by its defaults (what the fingerprint records)."""
    defaults = method_named(method).options
    return {key: default if options.get(key) is None else options[key] for key, default in defaults.items()}

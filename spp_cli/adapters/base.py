"""The adapter interface: what every recovery method (spp, lora, masked-lora, ia3, masked-full) provides.

Lifecycle, as in PEFT's tuners (STYLE.md):

    adapter = SomeAdapter.from_options(options)     # options: the schema's FinetuneStage (None = method default)
    model = adapter.inject(model, targets)            # in place, or a wrapper (PEFT); only adapter params train
    ... train; adapter.after_optimizer_step(model) after every optimizer step ...
    state = adapter.trainable_state(model)            # {name: full CPU tensor}
    adapter.save(model, adapter_dir, base_path=..., base_manifest_sha256=...)   # adapter_config.json + weights
    plain = adapter.merge(model)                      # plain nn.Linear modules: save_pretrained writes the
                                                      # original keys; keeps every zero iff adapter.keeps_zeros
`record()` is what spp.json's "adapter" and adapter_config.json hold: the config dataclass as JSON, never
written field by field (`file_record` may add values derived from it, `file_key` rename a tensor in the file).
Library code: no printing, no stage folders.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from spp_cli.adapters import REGISTRY, Method, resolved_method_options
from spp_cli.errors import BadInput
from spp_cli.io.atomic import atomic_dir

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


class Adapter:
    """One recovery method with its config. Subclasses set `name` and implement make_config/inject/merge."""

    name: ClassVar[str] = ""
    # whether inject adapts fused MoE expert slices (pruners/experts.py names) besides nn.Linear modules
    adapts_fused_experts: ClassVar[bool] = False

    def __init__(self, config: Any):
        self.config = config

    @property
    def method(self) -> Method:
        return REGISTRY[self.name]

    @property
    def keeps_zeros(self) -> bool:
        return self.method.keeps_zeros

    @classmethod
    def from_options(cls, options: Any) -> Adapter:
        """Build from a FinetuneStage (or any object with its fields): None options take the method's defaults."""
        values = {key: getattr(options, key, None) for key in REGISTRY[cls.name].options}
        return cls(cls.make_config(resolved_method_options(cls.name, values)))

    @classmethod
    def make_config(cls, options: dict[str, Any]) -> Any:
        """The config dataclass from the method's resolved options (schema names)."""
        raise NotImplementedError

    def validate(self) -> None:
        """BadInput on a config the method cannot run (checked before anything is loaded)."""

    def inject(self, model: nn.Module, targets: list[str]) -> nn.Module:
        """Adapt the named linears; freeze everything else. Returns the model to train (may be a wrapper)."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        """The plain model (original module tree and keys) with the trained update written into the weights."""
        raise NotImplementedError

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (masked-full re-applies its mask here)."""

    # ---- the merge of one layer from tensors: `merge` and the streaming merge (stages/merge_streaming.py) ----

    def file_layers(self, keys: list[str]) -> dict[str, dict[str, str]]:
        """{layer: {role: key}} for the keys of adapter_model.safetensors: each adapted layer (a linear's module
        name, or a fused experts parameter's name `<experts>.gate_up_proj`) and its tensors in the file."""
        raise NotImplementedError

    def merged_layer(self, layer: str, weight: torch.Tensor, bias: torch.Tensor | None,
                     tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The method's merge formula for one layer: (weight, bias) after the merge from the base's (the dtype the
        merge computes in) and the layer's adapter tensors by role (file_layers). Pure: nothing is mutated."""
        raise NotImplementedError

    def fits(self, layer: str, weight: tuple[int, ...], shapes: dict[str, tuple[int, ...]]) -> bool:
        """Whether the layer's adapter tensors (their shapes by role, file_layers) fit a base weight of shape
        `weight`, so merged_layer can run on them: checked for every layer before anything is merged."""
        raise NotImplementedError

    def record(self) -> dict:
        """spp.json's "adapter": the config dataclass as JSON (adapter_config.json adds peft_type and the base)."""
        return json_safe(dataclasses.asdict(self.config))

    def file_record(self, model: nn.Module) -> dict:
        """adapter_config.json's method part: record() unless a method adds values derived from its config."""
        return self.record()

    def file_key(self, parameter_name: str) -> str:
        """The name a trainable parameter has in adapter_model.safetensors: its own unless a method renames it."""
        return parameter_name

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """{parameter name: contiguous CPU copy} of every trainable parameter."""
        return {name: p.detach().cpu().contiguous().clone() for name, p in model.named_parameters()
                if p.requires_grad}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Load what trainable_state gave (onto a model this adapter injected); BadInput on a mismatch. assign: the
        tensors replace the parameters (meta ones too), cast to each parameter's dtype as copying into it casts."""
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if set(state) != set(trainable):
            extra = sorted(set(state) ^ set(trainable))[0]
            raise BadInput(f"the adapter state does not fit this model (e.g. {extra}): use the base it was trained on")
        for name, tensor in state.items():
            if tensor.shape != trainable[name].shape:
                raise BadInput(f"adapter tensor {name} has shape {list(tensor.shape)}, the model "
                               f"{list(trainable[name].shape)}: the adapter is damaged or for another base")
        if assign:
            state = {name: tensor.to(trainable[name].dtype) for name, tensor in state.items()}
        model.load_state_dict(state, strict=False, assign=assign)

    # ---- files: PEFT's layout, adapter_dir/{adapter_config.json, adapter_model.safetensors} ----

    def save(self, model: nn.Module, adapter_dir: str | os.PathLike, *, base_path: str,
             base_manifest_sha256: str | None, known_zeros: dict[str, str] | None = None) -> None:
        """Write the adapter atomically; records the base and the zeros_sha256 of every target (`known_zeros`' for
        a target whose weight is on the meta device: a weightless base, training/result.py adapted_weightless)."""
        from safetensors.torch import save_file

        state = {self.file_key(name): tensor for name, tensor in self.trainable_state(model).items()}
        if not state:
            raise BadInput("the model has no adapter parameters to save: inject (or train) an adapter first")
        targets = self.target_modules()
        config = {"peft_type": self.method.peft_type, **self.file_record(model), "base_model_name_or_path": base_path,
                  "base_manifest_sha256": base_manifest_sha256,
                  "base_zeros_sha256": target_zeros(targets, known_zeros, lambda name: target_weight(model, name),
                                                    lambda name: target_is_meta(model, name))}

        with atomic_dir(adapter_dir) as staging:
            (staging / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            save_file(state, str(staging / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def load(cls, model: nn.Module, adapter_dir: str | os.PathLike) -> tuple[Adapter, nn.Module]:
        """Inject into `model` and load the saved state; refuses a base whose target zero masks differ."""
        from safetensors.torch import load_file

        config = read_adapter_config(adapter_dir)
        check_base_zeros(model, config, adapter_dir)
        adapter = cls.from_file_record(config)
        adapted = adapter.inject(model, list(config["target_modules"]))
        weights = Path(adapter_dir) / ADAPTER_WEIGHTS_NAME
        if not weights.is_file():
            raise BadInput(f"{weights} not found: the adapter directory is incomplete")
        parameter_names = {adapter.file_key(name): name for name, p in adapted.named_parameters() if p.requires_grad}
        state = {parameter_names.get(key, key): tensor for key, tensor in load_file(str(weights)).items()}
        adapter.load_trainable_state(adapted, state)
        return adapter, adapted

    @classmethod
    def from_file_record(cls, record: dict) -> Adapter:
        """The adapter adapter_config.json describes (not injected: what a merge from tensors needs)."""
        return cls(cls.config_from_record(record))

    @classmethod
    def config_from_record(cls, record: dict) -> Any:
        config_class = cls.config_class()
        names = {f.name for f in dataclasses.fields(config_class)}
        return config_class(**{key: value for key, value in record.items() if key in names})

    @classmethod
    def config_class(cls) -> type:
        raise NotImplementedError

    def target_modules(self) -> list[str]:
        return list(self.config.target_modules)


# ---- helpers shared by the adapters ----


class WrappedLinear(nn.Module):
    """A layer around a frozen `self.base` nn.Linear (SPP, masked LoRA). Some model code reads `module.weight` /
    `.bias` (dtype checks, tied weights): it gets the base's."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias


def base_weight(module: nn.Module) -> torch.Tensor:
    """The frozen weight of a (possibly wrapped) linear: SPP/PEFT layers expose their base layer."""
    for attribute in ("base", "base_layer"):
        inner = getattr(module, attribute, None)
        if isinstance(inner, nn.Module):
            return base_weight(inner)
    return module.weight


def target_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The frozen weight (out, in) of target `name`: a (possibly wrapped) linear's, or a fused expert's slice."""
    from pruners.experts import weight_of

    try:
        return base_weight(model.get_submodule(name))
    except AttributeError:
        return weight_of(model, name)


def target_zeros(targets: list[str], known_zeros: dict[str, str] | None, weight_of, is_meta) -> dict[str, str]:
    """{target: zeros_sha256 of weight_of(target)}, `known_zeros`' where is_meta(target): its weight is not loaded."""
    from spp_cli.io.manifest import zeros_sha256

    return {name: known_zeros[name] if known_zeros is not None and is_meta(name) else zeros_sha256(weight_of(name))
            for name in targets}


def target_is_meta(model: nn.Module, name: str) -> bool:
    """Whether target `name`'s weight is on the meta device, read without running a parametrization (SPP's fused
    experts compute theirs from the meta original and the real adapter)."""
    from torch.nn.utils import parametrize

    try:
        return base_weight(model.get_submodule(name)).is_meta
    except AttributeError:
        owner, _, projection = name.rsplit(".", 2)
        experts = model.get_submodule(owner)
        parameter = "down_proj" if projection == "down_proj" else "gate_up_proj"
        if parametrize.is_parametrized(experts, parameter):
            return experts.parametrizations[parameter].original.is_meta
        return getattr(experts, parameter).is_meta


def json_safe(value: Any) -> Any:
    """A config dict as JSON data: sets become sorted lists, enums their value, unknown objects their str."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted(json_safe(item) for item in value)
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def resolve_targets(model: nn.Module, target_names: list[str], allowed: tuple[type, ...] = (nn.Linear,)) -> list[str]:
    """Full module names for `target_names`: exact names, or suffixes (PEFT-style `name.endswith(target)`)."""
    modules = dict(model.named_modules())
    resolved: list[str] = []
    for target in target_names:
        hits = [target] if target in modules else [n for n in modules if n.endswith("." + target)]
        if not hits:
            raise BadInput(f"target module {target!r} is not in the model: name a linear layer the model has")
        for name in hits:
            if not isinstance(modules[name], allowed):
                raise BadInput(f"target {name} is a {type(modules[name]).__name__}, not nn.Linear: the adapters "
                               "adapt linear layers only; remove it from the targets")
            if name not in resolved:
                resolved.append(name)
    return resolved


def default_targets(model: nn.Module, manifest: dict | None) -> list[str]:
    """The layers to adapt: the manifest's pruned layers if known, else every decoder linear with a zero.

    Raises BadInput when nothing is pruned ("nothing to preserve").
    """
    from pruners.sequential import prunable_linears

    if manifest and manifest.get("layers"):
        return list(manifest["layers"])
    targets = [name for name, linear in prunable_linears(model).items() if bool((linear.weight == 0).any())]
    if not targets:
        raise BadInput("nothing to preserve: the model has no zero weights in its decoder linears; "
                       "prune first, or use --method lora")
    return targets


def split_fused_experts(model: nn.Module, names: list[str]) -> tuple[list[str], list[str]]:
    """(the names that are modules, which adapters wrap; the names of fused MoE expert slices, which no module has).

    transformers 5 fuses a block's experts into 3-D parameters (experts.gate_up_proj (E, 2I, H), down_proj); the
    pruners name each expert's projection `<experts>.<e>.gate_proj` (pruners/experts.py). Only an adapter with
    `adapts_fused_experts` (spp, masked-full) adapts those; for the others they stay frozen (and keep their zeros)."""
    modules, experts = [], []
    for name in names:
        try:
            model.get_submodule(name)
            modules.append(name)
        except AttributeError:
            experts.append(name)
    return modules, experts


def fully_targeted_experts(model: nn.Module, expert_slices: list[str]) -> dict[tuple[str, str], list[str]]:
    """(experts module name, fused parameter name) -> its slice names, for each fused parameter every expert slice
    of which is named (gate_up_proj: E gate_proj + E up_proj slices; down_proj: E down_proj slices). An adapter
    trains a fused parameter whole, so one only partly pruned stays frozen (its other experts must not change)."""
    named: dict[tuple[str, str], set[str]] = {}
    for name in expert_slices:
        owner, _, projection = name.rsplit(".", 2)
        named.setdefault((owner, "down_proj" if projection == "down_proj" else "gate_up_proj"), set()).add(name)
    covered = {}
    for (owner, parameter), names in named.items():
        experts = getattr(model.get_submodule(owner), parameter).shape[0]
        if len(names) == experts * (1 if parameter == "down_proj" else 2):
            covered[(owner, parameter)] = sorted(names)
    return covered


def layers_by_suffix(keys: list[str], roles: dict[str, str]) -> dict[str, dict[str, str]]:
    """{layer: {role: key}} for the keys that end in one of `roles` (suffix -> role); the layer is the rest."""
    layers: dict[str, dict[str, str]] = {}
    for key in keys:
        for suffix, role in roles.items():
            if key.endswith(suffix):
                layers.setdefault(key.removesuffix(suffix), {})[role] = key
    return layers


def fitting_layers(adapter: Adapter, weights: Path, parameter_shapes: dict[str, tuple[int, ...]]
                   ) -> dict[str, dict[str, str]]:
    """The layers of the adapter file `weights` (file_layers), each checked by its tensors' shapes (from the file's
    header) against its base weight before anything is merged: BadInput, one line naming the layer, both shapes
    and the fix, when they do not fit. `parameter_shapes`: the base's parameters by name; a layer's weight is its
    `<layer>.weight` (a linear) or the parameter named as the layer (fused experts). A layer the base lacks is left
    to the caller's own check."""
    from spp_cli.io.safetensors_header import read_header

    tensor_shapes = {name: tuple(entry["shape"]) for name, entry in read_header(weights)[0].items()}
    layers = adapter.file_layers(sorted(tensor_shapes))
    for layer, roles in layers.items():
        weight = parameter_shapes.get(f"{layer}.weight", parameter_shapes.get(layer))
        shapes = {role: tensor_shapes[key] for role, key in roles.items()}
        if weight is None or adapter.fits(layer, tuple(weight), shapes):
            continue
        listed = ", ".join(f"{role} {list(shape)}" for role, shape in shapes.items())
        raise BadInput(f"adapter {weights} does not fit this base: layer {layer}'s tensors ({listed}) do not fit its "
                       f"weight {list(weight)}; the adapter is damaged or for another base: merge it into the model it "
                       "was trained on")
    return layers


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """adapter_config.json of an adapter directory (BadInput when missing or damaged)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise BadInput(f"{path} not found: point at a directory written by `spp finetune` (its adapter/ folder)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadInput(f"{path}: not valid JSON ({error}): the adapter directory is damaged") from None


def check_base_zeros(model: nn.Module, config: dict, adapter_dir: str | os.PathLike) -> None:
    """BadInput when a target's zero mask on `model` differs from the one the adapter was trained on."""
    from spp_cli.io.manifest import zeros_sha256

    for name, expected in (config.get("base_zeros_sha256") or {}).items():
        try:
            weight = target_weight(model, name)
        except (AttributeError, KeyError, ValueError):
            continue  # a layer this base lacks: loading the state then names it
        if zeros_sha256(weight) != expected:
            raise BadInput(f"adapter {adapter_dir} does not fit this base: layer {name} has a different zero mask; "
                           f"load it onto the model it was trained on ({config.get('base_model_name_or_path')})")

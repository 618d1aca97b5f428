"""A checkpoint's pruned layers read straight from its safetensors files, by their spp.json names (no model built).

spp.json names a layer as the model has it in memory: an nn.Linear (`model.layers.0.self_attn.q_proj`) or, for
transformers 5's fused experts, one expert's projection `model.layers.0.mlp.experts.3.gate_proj`, a row block of
`experts.gate_up_proj` (experts, 2*intermediate, hidden) (pruners/experts.py). On disk that weight (out, in) is
- `<name>.weight`: a plain linear, or an expert saved unfused under its in-memory name (Qwen3-MoE's
  `mlp.experts.3.gate_proj.weight`: save_pretrained reverts the fusion);
- a stored key that loading renames or stacks into it (Mixtral's `block_sparse_moe.experts.3.w1.weight`): found by
  running the model type's own conversion mapping (transformers.conversion_mapping) over the stored keys, as
  from_pretrained does;
- or a block of a fused tensor stored as is (`<experts>.gate_up_proj` [e, :half] is gate, [e, half:] up).
Every key is first named as loading names it: a checkpoint saved from the bare base model (facebook/opt-125m's
`decoder.layers.0.fc1.weight`) gets the causal LM's `base_model_prefix` (`model.decoder.layers.0.fc1.weight`), as
from_pretrained adds it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from spp_cli.errors import BadInput

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def open_weights(directory: Path) -> dict:
    """tensor name -> safe_open handle holding it, over every safetensors shard of `directory`."""
    from safetensors import safe_open

    handles = {}
    for path in sorted(directory.glob("*.safetensors")):
        handle = safe_open(str(path), framework="pt")
        for key in handle.keys():
            handles[key] = handle
    if not handles:
        raise BadInput(f"'{directory}' has no safetensors weights: point at a model directory")
    return handles


def base_model_prefix(model_type: str | None) -> str | None:
    """The `base_model_prefix` of the model type's causal LM class (OPTForCausalLM: "model"), None if unknown."""
    if not model_type:
        return None
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    model_class = getattr(transformers, name, None) if isinstance(name, str) else None
    return getattr(model_class, "base_model_prefix", None) or None


def loaded_keys(keys: list[str], prefix: str | None) -> dict[str, str]:
    """The name loading gives each stored key -> the stored key: `prefix.` added to every key when none has it
    (a checkpoint of the bare base model, as transformers' from_pretrained reads it), else the keys as they are."""
    if prefix and not any(key.startswith(f"{prefix}.") for key in keys):
        return {f"{prefix}.{key}": key for key in keys}
    return {key: key for key in keys}


def converted_names(keys: list[str], model_type: str | None) -> dict[str, str]:
    """In-memory layer name -> the stored key loading turns into its weight, for the keys the model type's
    conversion mapping renames (`.weight` dropped) or stacks into fused experts (`<experts>.<e>.<projection>`).
    Only the stacking spp's expert slices assume is mapped: MergeModulelist(dim=0), then for gate_up_proj
    Concatenate(dim=1) of [gate, up]; any other converter's keys stay unmapped (their layers then read as absent)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    from spp_cli.io.key_renames import converted_key, renamed_key

    transforms = (get_checkpoint_conversion_mapping(model_type) if model_type else None) or []
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter) and _stacks_experts(t)]
    names = {}
    for key in keys:
        renamed = renamed_key(key, renamings)
        target, pattern = converted_key(renamed, converters)
        if pattern is None:
            if renamed != key and renamed.endswith(".weight"):
                names[renamed.removesuffix(".weight")] = key
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        owner, fused = target.rsplit(".", 1)
        # the `*` of the source pattern is the expert's index, the position MergeModulelist stacks it at
        expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), renamed)
        if expert is None:
            continue
        part = converter.source_patterns.index(pattern)  # gate_up_proj stacks [gate; up]
        projection = "down_proj" if fused == "down_proj" else EXPERT_PROJECTIONS[part]
        names[f"{owner}.{int(expert.group(1))}.{projection}"] = key
    return names


def _stacks_experts(converter) -> bool:
    operations = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    target = converter.target_patterns[0] if len(converter.target_patterns) == 1 else ""
    if target.endswith("gate_up_proj"):
        return len(converter.source_patterns) == 2 and operations == [("MergeModulelist", 0), ("Concatenate", 1)]
    return target.endswith("down_proj") and operations == [("MergeModulelist", 0)]


class StoredWeights:
    """The weights of `directory`'s layers by their in-memory names, read lazily from its safetensors shards."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.handles = open_weights(self.directory)
        self._loaded: dict[str, str] | None = None  # loaded name -> stored key, built on the first name not stored
        self._converted: dict[str, str] | None = None  # as is, with the names the conversion mapping gives

    def _model_type(self) -> str | None:
        config = self.directory / "config.json"
        return json.loads(config.read_text()).get("model_type") if config.is_file() else None

    def __getitem__(self, layer: str) -> torch.Tensor:
        """The weight (out, in) of `layer`; BadInput when the checkpoint does not hold it."""
        key = f"{layer}.weight"
        if key in self.handles:
            return self.handles[key].get_tensor(key)
        if self._loaded is None:
            model_type = self._model_type()
            self._loaded = loaded_keys(list(self.handles), base_model_prefix(model_type))
            self._converted = converted_names(list(self._loaded), model_type)
        key = self._loaded.get(key) or self._loaded.get(self._converted.get(layer))
        if key is not None:
            return self.handles[key].get_tensor(key)
        weight = self._fused_block(layer)
        if weight is None:
            raise BadInput(f"'{self.directory}' has no tensor for '{layer}' although spp.json lists it: "
                           "the checkpoint is incomplete")
        return weight

    def _fused_block(self, layer: str) -> torch.Tensor | None:
        """An expert's projection from a fused tensor stored as is: gate_up_proj (experts, 2*I, H) or down_proj."""
        parts = layer.rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit() or parts[2] not in EXPERT_PROJECTIONS:
            return None
        owner, expert, projection = parts[0], int(parts[1]), parts[2]
        key = self._loaded.get(f"{owner}.{'down_proj' if projection == 'down_proj' else 'gate_up_proj'}")
        if key is None:
            return None
        fused = self.handles[key].get_slice(key)  # reads only the expert's block, not the whole tensor
        rows = fused.get_shape()[1]
        block = {"gate_proj": slice(0, rows // 2), "up_proj": slice(rows // 2, rows)}.get(projection, slice(0, rows))
        return fused[expert:expert + 1, block][0]

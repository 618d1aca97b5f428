"""The streaming merge: an adapter merged into its base one parameter at a time, from the base's safetensors shards
straight into the output's, so the process holds one parameter (plus the adapter's tensors for it), not the model.

The output is what the in-memory merge writes (from_pretrained in the merge's dtype, the adapter's merge, a cast to
the stored dtype, save_pretrained), byte for byte: the output files are planned from a weightless skeleton with the
weight conversions from_pretrained would record (streamed_checkpoint.plan_output); each in-memory parameter is
assembled from its stored tensors (a fused MoE experts parameter from its experts' slices, as loading stacks them),
cast to the merge's dtype, merged with the method's own formula (`Adapter.merged_layer`, which the in-memory merge
calls too), cast to the stored dtype and written at its planned offsets (split back into its slices, as saving
does). Each pruned layer's spp.json record and the zero checks are made on the way.

Resume: the shards are laid out in a staging directory (`.<out>.spp-work`, or inside the finetune stage's work dir)
that becomes the output only when complete. `resume.json` holds the number of units written and their records,
replaced atomically every SAVE_EVERY_BYTES and tied to the run's fingerprint (options, input shards, adapter, dtype,
device, versions), so a killed run leaves nothing that looks complete and a rerun writes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spp_cli.errors import BadInput, CheckFailed
from spp_cli.events import Listener, notify
from spp_cli.io import atomic, checkpoint
from spp_cli.io.manifest import layer_record, zeros_sha256
from spp_cli.stages.streamed_checkpoint import (
    LOCK_FILE,
    RESUME_FILE,
    NotStreamable,
    OutputPlan,
    SafetensorsSource,
    ShardWriter,
    StagedRun,
    in_memory_state_dict,
    loaded_conversions,
    plan_output,
    weightless_model,
    write_resume_state,
)

SAVE_EVERY_BYTES = 256 * 2**20  # resume.json is rewritten once this much more is written (and never more often)
EXPERT_PROJECTIONS = {"gate_up_proj": (("gate_proj", 0), ("up_proj", 1)), "down_proj": (("down_proj", None),)}


@dataclass
class MergeInput:
    """The base, read lazily: its skeleton (in the merge's dtype), shards, output plan, and where each in-memory
    parameter is stored."""

    model: torch.nn.Module
    source: SafetensorsSource
    plan: OutputPlan
    stored_dtype: torch.dtype
    shapes: dict[str, torch.Size]  # in-memory parameter -> shape, in save_pretrained's order
    dtypes: dict[str, torch.dtype]  # in-memory parameter -> the dtype the merge computes it in
    stored: dict[str, str]  # in-memory layer name -> the stored key loading converts into it, where they differ

    def layer_slices(self, name: str) -> list[tuple[str, tuple]]:
        """(layer name, index into the parameter) of each prunable layer parameter `name` holds: a linear's weight
        whole, or each expert's projection of fused experts (pruners/experts.py: gate [e, :I], up [e, I:])."""
        owner, _, leaf = name.rpartition(".")
        shape = self.shapes[name]
        if leaf in EXPERT_PROJECTIONS and len(shape) == 3:
            half = shape[1] // 2
            return [(f"{owner}.{e}.{projection}", (e,) if part is None else (e, slice(part * half, (part + 1) * half)))
                    for e in range(shape[0]) for projection, part in EXPERT_PROJECTIONS[leaf]]
        return [(owner, ())] if leaf == "weight" else []

    def pieces(self, name: str) -> list[tuple[str, tuple]]:
        """(stored key, index into the parameter) of each tensor parameter `name` is stored (and saved) as."""
        if name in self.source.entries:
            return [(name, ())]
        slices = self.layer_slices(name)
        if len(slices) > 1:  # fused experts stored unfused, one tensor per expert and projection
            return [(self.stored.get(layer, layer), index) for layer, index in slices]
        return [(self.stored.get(name.removesuffix(".weight"), name), ())]

    def read(self, name: str) -> torch.Tensor:
        """Parameter `name` as loading gives it: assembled from its stored pieces, in the merge's dtype."""
        pieces = self.pieces(name)
        tensors = self.source.read([key for key, _ in pieces])
        if pieces[0][1] == ():
            value = tensors[pieces[0][0]]
        else:
            value = torch.empty(self.shapes[name], dtype=tensors[pieces[0][0]].dtype)
            for key, index in pieces:
                value[index] = tensors.pop(key)
        return value.to(self.dtypes[name]) if value.is_floating_point() else value


def open_merge_input(base_dir: str | Path, dtype: str, trust_remote_code: bool = False) -> MergeInput:
    """The base at `base_dir` (a local safetensors folder) for a merge computing in `dtype`. NotStreamable when its
    shards cannot be streamed into exactly save_pretrained's files (the caller merges in memory)."""
    from spp_cli.io.stored_weights import converted_names

    directory = Path(base_dir)
    source = SafetensorsSource(directory)
    model = weightless_model(directory, source, dtype, trust_remote_code)
    stored_dtype = checkpoint.stored_dtype(str(directory), model)
    keys = list(source.entries)
    plan = plan_output(model, stored_dtype, checkpoint.parent_shard_size(directory), loaded_conversions(model, keys))
    state = in_memory_state_dict(model)
    merge_input = MergeInput(model, source, plan, stored_dtype, {name: t.shape for name, t in state.items()},
                             {name: t.dtype for name, t in state.items()},
                             converted_names(keys, model.config.model_type))
    written = sorted(key for name in state for key, _ in merge_input.pieces(name))
    if written != sorted(plan.tensors):
        raise NotStreamable("its shards name its tensors differently from how saving names them")
    for key, spot in plan.tensors.items():
        if tuple(source.entries[key][2]) != spot.shape:
            raise NotStreamable(f"its shards hold {key!r} with shape {source.entries[key][2]}, saving {spot.shape}")
    return merge_input


def file_sha256(path: Path, chunk: int = 16 * 2**20) -> str:
    """sha256 of a file's bytes, read a chunk at a time (masked-full's adapter is as large as its targets)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def adapter_merge(merge_input: MergeInput, adapter, adapter_dir: Path, staging: Path, stage_fingerprint: str, *,
                  pruned: list[str], dtype: str, device: str = "cpu") -> StreamingMerge:
    """The StreamingMerge of the adapter saved in `adapter_dir` (its method's `adapter`, config loaded) into
    `merge_input` (opened in `dtype`), computing on `device`, staged in `staging`, resumable while the stage's
    fingerprint, the input shards, the adapter's bytes, dtype, device and versions stay the same."""
    from spp_cli.adapters.base import ADAPTER_WEIGHTS_NAME, read_adapter_config
    from spp_cli.environment import versions

    weights = adapter_dir / ADAPTER_WEIGHTS_NAME
    content = {"stage": stage_fingerprint, "input": merge_input.source.identity(), "dtype": dtype,
               "adapter": file_sha256(weights), "device": str(device),
               "versions": versions()}
    run = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
    return StreamingMerge(merge_input, adapter, read_adapter_config(adapter_dir), weights, staging, run,
                          pruned=pruned, device=device)


@dataclass
class Unit:
    """What is merged at once: an adapted layer's parameters (a linear's weight and bias, or a fused experts
    parameter), or one other parameter."""

    parameters: list[str]
    layer: str | None = None  # the adapter's layer name (Adapter.file_layers)


def merge_units(merge_input: MergeInput, layers: dict[str, dict[str, str]], weights: Path) -> list[Unit]:
    """The base's parameters in save order, grouped by adapted layer; BadInput for an adapter layer it lacks."""
    owner: dict[str, str] = {}
    for layer in layers:
        if f"{layer}.weight" in merge_input.shapes:
            owner[f"{layer}.weight"] = layer
            if f"{layer}.bias" in merge_input.shapes:
                owner[f"{layer}.bias"] = layer
        elif layer in merge_input.shapes:
            owner[layer] = layer
        else:
            raise BadInput(f"{weights} holds tensors this base lacks ({layer}): use its base")
    units: list[Unit] = []
    by_layer: dict[str, Unit] = {}
    for name in merge_input.shapes:
        layer = owner.get(name)
        if layer in by_layer:
            by_layer[layer].parameters.append(name)
            continue
        units.append(Unit([name], layer))
        if layer is not None:
            by_layer[layer] = units[-1]
    return units


class StreamingMerge(StagedRun):
    """Merges `adapter` (the method's Adapter, its config loaded) from `adapter_weights` into `merge_input` in the
    staging directory `staging`: `run` writes the shards and returns the layers' records, `publish` adds the rest
    and moves it to the output, `discard` removes it."""

    def __init__(self, merge_input: MergeInput, adapter, adapter_config: dict, adapter_weights: Path, staging: Path,
                 fingerprint: str, *, pruned: list[str], device: str = "cpu") -> None:
        self.input = merge_input
        self.adapter = adapter
        self.base_zeros = adapter_config.get("base_zeros_sha256") or {}
        self.adapter_dir = adapter_weights.parent
        self.adapter_weights = adapter_weights
        self.staging = staging
        self.writer = ShardWriter(staging, merge_input.plan)
        self.fingerprint = fingerprint
        self.pruned = set(pruned)
        self.order = list(pruned)
        self.device = torch.device(device)
        self.records: dict[str, dict] = {}
        self.lost: list[str] = []
        self.next_unit = 0

    def run(self, on_event: Listener | None = None) -> dict[str, dict]:
        """Write every parameter, merged where adapted; spp.json's layer records in `pruned` order. CheckFailed when
        a zero-keeping merge lost a zero, BadInput when the adapter does not fit the base (nothing is left): its
        layers and their tensors' shapes are checked against the base's before the staging dir is opened."""
        from safetensors import safe_open

        from spp_cli.adapters.base import fitting_layers

        layers = fitting_layers(self.adapter, self.adapter_weights, self.input.shapes)
        units = merge_units(self.input, layers, self.adapter_weights)
        self._open()
        try:
            with safe_open(str(self.adapter_weights), framework="pt", device="cpu") as adapter_file:
                written = 0
                for index, unit in enumerate(units):
                    if index < self.next_unit:
                        continue
                    tensors = {role: adapter_file.get_tensor(key) for role, key in layers.get(unit.layer, {}).items()}
                    written += self._merge_unit(unit, tensors)
                    if written >= SAVE_EVERY_BYTES:
                        self.next_unit, written = index + 1, 0
                        self._save_state()
                    notify(on_event, "merge", "progress", {"done": index + 1, "total": len(units), "label": "tensors"})
            if self.lost and self.adapter.keeps_zeros:
                raise CheckFailed(f"the merge lost zeros in {len(self.lost)} layers ({', '.join(self.lost[:3])}...): "
                                  "not saved")
        except (BadInput, CheckFailed):
            self.discard()
            raise
        return {name: self.records[name] for name in self.order}

    def _merge_unit(self, unit, tensors: dict[str, torch.Tensor]) -> int:
        """Read, merge, check, record and write one unit; the bytes written."""
        base = {name: self.input.read(name) for name in unit.parameters}
        merged = dict(base)
        if unit.layer is not None:
            weight_name = next(name for name in unit.parameters if not name.endswith(".bias"))
            bias_name = next((name for name in unit.parameters if name.endswith(".bias")), None)
            weight, bias = self.adapter.merged_layer(
                unit.layer, base[weight_name].to(self.device), None if bias_name is None else base[bias_name].to(
                    self.device), {role: tensor.to(self.device) for role, tensor in tensors.items()})
            merged[weight_name] = weight.cpu()
            if bias_name is not None:
                merged[bias_name] = bias.cpu()
        written = 0
        for name in unit.parameters:
            stored = merged.pop(name)
            stored = stored.to(self.input.stored_dtype) if stored.is_floating_point() else stored
            self._check_and_record(name, base.pop(name), stored)
            pieces = {key: stored[index].contiguous() for key, index in self.input.pieces(name)}
            self.writer.write(pieces)
            written += sum(piece.numel() * piece.element_size() for piece in pieces.values())
        return written

    def _check_and_record(self, name: str, base: torch.Tensor, stored: torch.Tensor) -> None:
        """The records of the pruned layers in parameter `name`, the adapter's base zeros (check_base_zeros) and the
        zeros kept (check_zeros_kept): `base` as loaded, `stored` merged in the stored dtype."""
        for layer, index in self.input.layer_slices(name):
            if layer not in self.pruned and layer not in self.base_zeros:
                continue
            parent_zeros = zeros_sha256(base[index])
            if layer in self.base_zeros and parent_zeros != self.base_zeros[layer]:
                raise BadInput(f"adapter {self.adapter_dir} does not fit this base: layer {layer} has a different zero "
                               f"mask; load it onto the model it was trained on ({self.input.source.directory})")
            if layer not in self.pruned:
                continue
            record = layer_record(stored[index])
            self.records[layer] = record
            if record["zeros_sha256"] != parent_zeros and bool(((base[index] == 0) & (stored[index] != 0)).any()):
                self.lost.append(layer)

    # -- the staging directory ----------------------------------------------------------------------------------

    def _open(self) -> None:
        """Take the staging dir: resume it when it holds this very run, else lay the shards out afresh."""
        state = self._take_staging(f"another spp merge is writing '{self.staging}' right now: wait for it or "
                                   "choose another --out")
        if state is not None and state.get("fingerprint") == self.fingerprint and self.writer.laid_out():
            self.next_unit, self.records, self.lost = state["next_unit"], state["records"], state["lost"]
            return
        self._clear_staging()
        self.writer.lay_out()
        self._save_state()

    def _save_state(self) -> None:
        state = {"fingerprint": self.fingerprint, "next_unit": self.next_unit, "records": self.records,
                 "lost": self.lost}
        write_resume_state(self.staging, state)

    def publish(self, out: Path, manifest: dict, tokenizer, started: float,
                extra_dirs: dict[str, Path] | None = None, configured=None) -> dict:
        """Add the index, config, generation config, tokenizer, the parent's files, `extra_dirs` and spp.json as
        checkpoint.save_checkpoint does, and move the staging dir to `out` atomically; the finished manifest.
        `configured`: the model whose config the in-memory merge would save (the trained one), else the base's."""
        try:
            write_model_files(self.staging, self.input, tokenizer, configured)
            for name, source in (extra_dirs or {}).items():
                shutil.copytree(source, self.staging / name)
            finished = checkpoint.finish_manifest(manifest, time.time() - started)
            for name in (RESUME_FILE, LOCK_FILE):
                (self.staging / name).unlink(missing_ok=True)
            checkpoint.write_manifest(self.staging, finished)
        finally:
            self.close()
        atomic.remove_stale(out)  # as atomic_dir does: a killed run's leftovers beside the output
        atomic.follow_umask(self.staging)
        atomic.publish(self.staging, out)
        return finished


def write_model_files(directory: Path, merge_input: MergeInput, tokenizer, configured=None) -> None:
    """What save_pretrained (and save_checkpoint) write besides the weights: the shards' index, config.json in the
    stored dtype, the generation config, the tokenizer and the parent's chat template files. The config and
    generation config are `configured`'s (a model, e.g. the trained one: training sets use_cache off), else the
    base's."""
    model = configured if configured is not None else merge_input.model
    ShardWriter(directory, merge_input.plan).write_index()
    model.config.dtype = str(merge_input.stored_dtype).split(".")[1]  # what save_pretrained records
    model.config.architectures = [type(merge_input.model).__name__]
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    parent_dir = merge_input.source.directory
    for name in checkpoint.PARENT_FILES:
        if (parent_dir / name).is_file() and not (directory / name).exists():
            shutil.copy2(parent_dir / name, directory / name)

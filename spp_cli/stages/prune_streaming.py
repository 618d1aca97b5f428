"""The streaming prune: a model of any depth pruned in the memory of one block, resumable at the block.

`open_streamed_model` builds the model as a skeleton without weights (parameters on the meta device; buffers such
as rotary frequencies are computed as usual), loads the tensors outside the decoder blocks (embeddings, final norm,
lm_head: what the capture pass runs before block 0, and small next to the blocks) and plans the output files
exactly as save_pretrained would write them (streamed_checkpoint.py).
`StreamingStore` is the driver's BlockStore (pruners/streaming.py): block i's tensors are read from the input's
shards just before it runs, and once it is pruned they are cast to the stored dtype and written at their final
place in the output's shard files, recorded (spp.json's layer entries), and freed. That keeping runs on one writer
thread (streamed_checkpoint.BackgroundWriter) while the driver computes block i + 1, so the streamed path costs
about what the in-memory one does per block; the process holds two blocks at that moment (the one computed, the
one written), and block i's event is sent once block i is kept (`when_kept`), from the writer thread.
Resume: everything lives in the output's resume directory (atomic.work_dir: `.<out>.spp-work`, the stable
sibling kept across runs), which becomes the output when complete.
After each block it holds the block's pruned tensors (in the shards), the hidden states entering the next block
(`inputs-<i>.pt`) and `resume.json` (the block reached, the reports so far, and the run's fingerprint), replaced
atomically in that order. A rerun whose fingerprint (the stage's options and input, the calibration windows' hash,
the input shards' names, sizes and mtimes, device, dtype, versions) matches resumes at the next block; any other
staging directory is wiped. The pruners draw no random numbers (the windows are drawn before, from the seed), so
there is no RNG state to keep. A lock (flock) keeps two live runs off one staging directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruners.reports import LayerReport, OwlProfile
from spp_cli.errors import BadInput
from spp_cli.io import atomic, checkpoint
from spp_cli.io.manifest import layer_record
from spp_cli.stages.streamed_checkpoint import (
    LOCK_FILE,
    RESUME_FILE,
    BackgroundWriter,
    NotStreamable,
    OutputPlan,
    SafetensorsSource,
    ShardWriter,
    StagedRun,
    write_resume_state,
)


def wants_streaming(streaming: str, model_path: str) -> bool:
    """auto: stream whenever the model is a local directory with safetensors weights; on: insist; off: never."""
    local = Path(model_path).is_dir() and SafetensorsSource.usable(Path(model_path))
    if streaming == "on" and not local:
        raise BadInput(
            f"--streaming on needs a local model directory with safetensors weights, not '{model_path}': "
            "download it first or use --streaming auto"
        )
    return streaming != "off" and local


def streamed_model(streaming: str, model_path: str, dtype: str, trust_remote_code: bool) -> StreamedModel | None:
    """The streamed skeleton (`open_streamed_model`) when `streaming` and the model allow it, else None (the
    in-memory path). Raises BadInput when `streaming` is "on" and the model cannot be streamed."""
    if not wants_streaming(streaming, model_path):
        return None
    try:
        return open_streamed_model(model_path, dtype, trust_remote_code)
    except NotStreamable as reason:
        if streaming == "on":
            raise BadInput(f"--streaming on cannot write this model tensor by tensor: {reason}; "
                           "use --streaming auto") from None
        return None


def staging_path(out: Path) -> Path:
    """Where a streamed prune into `out` keeps its work until it is complete."""
    return atomic.work_dir(out)


def release_freed_memory() -> None:
    """Hand the freed block back to the OS. glibc raises its mmap threshold to the size of each large buffer freed,
    so the next blocks' tensors come from the heap, whose freed pages it keeps: without a trim the process grows
    by about one block per block (measured: +55 MB per hidden-1024 block). A no-op where libc has no malloc_trim."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `name` (dotted, relative to `module`) by `value`, keeping its kind."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=owner._parameters[leaf].requires_grad)
    else:
        owner._buffers[leaf] = value


@dataclasses.dataclass
class StreamedModel:
    model: nn.Module  # blocks on the meta device, everything else loaded in the compute dtype
    source: SafetensorsSource
    plan: OutputPlan
    prefix: str  # the blocks' ModuleList name, e.g. "model.layers"
    stored_dtype: torch.dtype


def open_streamed_model(model_path: str, dtype: str, trust_remote_code: bool) -> StreamedModel:
    """The skeleton of the model at `model_path` with everything outside its blocks loaded, and its output plan.

    Raises BadInput when the shards miss a tensor the model needs (one line naming it), NotStreamable when the
    architecture cannot be written tensor by tensor (the caller falls back to the in-memory path)."""
    from pruners.blocks import UnsupportedModelError, find_decoder_blocks
    from pruners.experts import is_fused_experts
    from spp_cli.stages.streamed_checkpoint import weightless_model

    directory = Path(model_path)
    source = SafetensorsSource(directory)
    model = weightless_model(directory, source, dtype, trust_remote_code)  # tied, generation config, eval mode
    try:
        prefix, blocks = find_decoder_blocks(model)
    except UnsupportedModelError as error:
        raise BadInput(str(error)) from None
    if any(is_fused_experts(module) for module in model.modules()):
        raise NotStreamable("fused MoE experts are not streamed yet")
    stored = checkpoint.stored_dtype(str(directory), model)
    plan = _plan(model, stored, directory)
    _check_source_covers(source, plan, prefix, len(blocks), directory)
    skeleton = model.state_dict(keep_vars=True)
    outer = [name for name in plan.tensors if not name.startswith(prefix + ".")]
    for name, tensor in source.read(outer).items():
        _set_tensor(model, name, tensor.to(skeleton[name].dtype))
    model.tie_weights()  # a tied lm_head follows the embedding just loaded
    return StreamedModel(model, source, plan, prefix, stored)


def _plan(model: nn.Module, stored: torch.dtype, directory: Path) -> OutputPlan:
    from spp_cli.stages.streamed_checkpoint import plan_output

    return plan_output(model, stored, checkpoint.parent_shard_size(directory))


def _check_source_covers(source: SafetensorsSource, plan: OutputPlan, prefix: str, depth: int,
                         directory: Path) -> None:
    """Every planned tensor is in the shards with its shape; names missing while others are unknown mean an older
    naming that from_pretrained converts (NotStreamable: the in-memory path loads it), else BadInput."""
    missing = [name for name in plan.tensors if name not in source.entries]
    if missing and any(name not in plan.tensors for name in source.entries):
        raise NotStreamable(f"its shards name tensors differently ({missing[0]!r} is not among them)")
    for name, spot in plan.tensors.items():
        where = ""
        if name.startswith(prefix + "."):
            where = f" (block {name[len(prefix) + 1:].split('.', 1)[0]} of {depth})"
        if name not in source.entries:
            raise BadInput(f"'{directory}' has no tensor '{name}'{where}: its safetensors shards are incomplete; "
                           "re-download or re-save the model")
        if tuple(source.entries[name][2]) != spot.shape:
            raise BadInput(f"'{directory}' holds '{name}' with shape {tuple(source.entries[name][2])}, its config "
                           f"needs {spot.shape}: re-save the model with a matching config.json")


class StreamingStore(StagedRun):
    """The BlockStore that reads blocks from the input's shards and writes them into the output's staging dir."""

    def __init__(self, streamed: StreamedModel, out: Path, run_fingerprint: str) -> None:
        self.streamed = streamed
        self.out = out
        self.staging = staging_path(out)
        self.writer = ShardWriter(self.staging, streamed.plan)
        self.jobs = BackgroundWriter()  # keeps each finished block while the next one is computed (block_done)
        self.fingerprint = run_fingerprint
        self.first_block = 0
        self.done_blocks: list[int] = []
        self.reports: list[dict] = []  # LayerReport fields of the finished blocks, in order
        self.layers: dict[str, dict] = {}  # spp.json layer entries of the finished blocks
        self.resumed_from: int | None = None  # the first block of this run, when it continues a killed one
        self.owl_profile: dict | None = None  # OwlProfile fields, once OWL's dense pass has run

    # -- the staging directory ----------------------------------------------------------------------------------

    def open(self) -> None:
        """Take the staging dir: resume it when it holds this very run, else start it afresh."""
        state = self._take_staging(f"another spp prune is writing '{self.out}' right now: wait for it or choose "
                                   "another --out")
        if state is not None and state.get("fingerprint") == self.fingerprint and self.writer.laid_out():
            self.first_block = state["next_block"]
            self.done_blocks, self.reports, self.layers = state["done_blocks"], state["reports"], state["layers"]
            self.owl_profile = state.get("owl_profile")
            self.resumed_from = self.first_block if self.first_block > 0 else None
            return
        self._clear_staging()
        self.writer.lay_out()
        self._write_state(next_inputs_file=None)

    def resume_note(self) -> str | None:
        """The line saying this run continues a killed one (None when it starts afresh): where it resumes, which
        blocks it keeps and from where, so a user seeing "block 3/24" first knows where blocks 1-2 went."""
        if self.resumed_from is None:
            return None
        total = len(self.streamed.model.get_submodule(self.streamed.prefix))
        kept = "block 1" if self.resumed_from == 1 else f"blocks 1-{self.resumed_from}"
        if self.resumed_from >= total:  # killed after its last block, before the output was complete
            return f"resuming after the last block (all {total} kept from the interrupted run at {self.staging})"
        return (f"resuming at block {self.resumed_from + 1} of {total} ({kept} kept from the interrupted run at "
                f"{self.staging})")

    def _write_state(self, next_inputs_file: str | None) -> None:
        state = {"fingerprint": self.fingerprint, "next_block": self.first_block, "done_blocks": self.done_blocks,
                 "inputs": next_inputs_file, "reports": self.reports, "layers": self.layers,
                 "owl_profile": self.owl_profile}
        write_resume_state(self.staging, state)

    def close(self) -> None:
        """Wait for the writer thread, then release the lock."""
        self.jobs.close()
        super().close()

    # -- the BlockStore protocol --------------------------------------------------------------------------------

    def resume_inputs(self) -> torch.Tensor | None:
        name = (self._read_state() or {}).get("inputs")
        return torch.load(self.staging / name, weights_only=True) if name else None

    def _block_names(self, index: int, block: nn.Module) -> dict[str, str]:
        """Relative name in the block -> full name in the checkpoint, for the block's saved tensors."""
        full = f"{self.streamed.prefix}.{index}."
        return {name: full + name for name in block.state_dict() if full + name in self.streamed.plan.tensors}

    def load_block(self, index: int, block: nn.Module) -> None:
        names = self._block_names(index, block)
        tensors = self.streamed.source.read(list(names.values()))
        current = block.state_dict(keep_vars=True)
        for relative, full in names.items():
            _set_tensor(block, relative, tensors.pop(full).to(current[relative].dtype))

    def unload_block(self, index: int, block: nn.Module) -> None:
        """Back to weightless, keeping nothing (after OWL's dense pass; block_done after the prune pass)."""
        current = block.state_dict()
        for relative in list(current):
            _set_tensor(block, relative, torch.empty_like(current.pop(relative), device="meta"))
        release_freed_memory()

    def saved_owl_profile(self):
        return None if self.owl_profile is None else OwlProfile(**self.owl_profile)

    def save_owl_profile(self, profile) -> None:
        """Kept in resume.json from now on (floats round-trip exactly through JSON). The dense pass runs before any
        block is pruned, so there are no saved inputs yet."""
        self.jobs.wait()
        self.owl_profile = dataclasses.asdict(profile)
        self._write_state(None)

    def block_done(self, index: int, block: nn.Module, reports: list, next_inputs: torch.Tensor | None) -> None:
        """Empty `block` and hand its tensors to the writer thread (`_keep_block`), which keeps them while the driver
        computes the next block; first wait for the previous block's job, whose `next_inputs` buffer the next block
        is about to overwrite."""
        from pruners.experts import weight_of

        names = self._block_names(index, block)
        current = block.state_dict()
        tensors = {full: current[relative] for relative, full in names.items()}
        # weight_of: an MoE expert is a slice of a fused parameter, not a module
        weights = {report.name: weight_of(self.streamed.model, report.name) for report in reports}
        records = [dataclasses.asdict(report) for report in reports]
        del current
        self.unload_block(index, block)
        self.jobs.start(partial(self._keep_block, index, tensors, weights, records, next_inputs))

    def _keep_block(self, index: int, tensors: dict, weights: dict, records: list[dict],
                    next_inputs: torch.Tensor | None) -> None:
        """On the writer thread: block `index`'s tensors at their place in the shards, its layers' records, the
        hidden states entering the next block, then resume.json (a kill leaves the old state or the new one)."""
        self.writer.write({full: self._as_stored(tensors.pop(full)) for full in list(tensors)})
        for name in list(weights):
            self.layers[name] = layer_record(self._as_stored(weights.pop(name)))
        self.reports += records
        release_freed_memory()
        inputs_file = None
        if next_inputs is not None:
            inputs_file = f"inputs-{index + 1}.pt"
            torch.save(next_inputs, self.staging / (inputs_file + ".tmp"))
            os.replace(self.staging / (inputs_file + ".tmp"), self.staging / inputs_file)
        self.done_blocks.append(index)
        self.first_block = index + 1
        self._write_state(inputs_file)
        for old in self.staging.glob("inputs-*.pt"):  # only now is the previous block's file no longer needed
            if old.name != inputs_file:
                old.unlink()

    def when_kept(self, listener: Callable[[Any], None]) -> Callable[[Any], None]:
        """`listener` (the driver's on_block) called on the writer thread once the block just handed to
        block_done is kept: a block reported is a block a rerun resumes after, even after kill -9."""
        return lambda report: self.jobs.then(partial(listener, report))

    def flush(self) -> None:
        """Return once every finished block is kept (and reported); raise what keeping one of them raised."""
        self.jobs.wait()

    def layer_reports(self) -> list[LayerReport]:
        """The LayerReports of every finished block, those of a killed run this one resumed included."""
        return [LayerReport(**report) for report in self.reports]

    def _as_stored(self, tensor: torch.Tensor) -> torch.Tensor:
        """The in-memory path casts the whole model back to its stored dtype before saving: the same here."""
        return tensor.to(self.streamed.stored_dtype) if tensor.is_floating_point() else tensor

    # -- finishing ----------------------------------------------------------------------------------------------

    def finish(self, manifest: dict, tokenizer, parent_dir: Path, started: float) -> dict:
        """Copy what no block wrote, add config, tokenizer and spp.json, and publish atomically like
        checkpoint.save_checkpoint (the manifest is finished by checkpoint.finish_manifest)."""
        try:
            return self._finish(manifest, tokenizer, parent_dir, started)
        finally:
            self.close()

    def _finish(self, manifest: dict, tokenizer, parent_dir: Path, started: float) -> dict:
        self.flush()
        done = tuple(f"{self.streamed.prefix}.{index}." for index in self.done_blocks)
        model = self.streamed.model
        skeleton = model.state_dict(keep_vars=True)
        for name in self.streamed.plan.tensors:  # what no block wrote (outside the blocks, blocks never run), one
            if name.startswith(done):  # tensor at a time, cast like the in-memory path: compute, then stored dtype
                continue
            tensor = self.streamed.source.read([name])[name]
            compute = skeleton[name].dtype if name in skeleton else tensor.dtype
            self.writer.write({name: self._as_stored(tensor.to(compute))})
        self.writer.write_index()
        model.config.dtype = str(self.streamed.stored_dtype).split(".")[1]  # what save_pretrained records
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(self.staging)
        if model.can_generate():
            model.generation_config.save_pretrained(self.staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.staging)
        for name in checkpoint.PARENT_FILES:
            if (parent_dir / name).is_file() and not (self.staging / name).exists():
                shutil.copy2(parent_dir / name, self.staging / name)
        finished = checkpoint.finish_manifest(manifest, time.time() - started)
        for name in (RESUME_FILE, LOCK_FILE):
            (self.staging / name).unlink(missing_ok=True)
        for old in self.staging.glob("inputs-*.pt"):
            old.unlink()
        checkpoint.write_manifest(self.staging, finished)
        self.close()  # before the rename: the lock file is gone, and the directory becomes the output
        atomic.remove_stale(self.out)  # as atomic_dir does: a killed run's leftovers beside the output
        atomic.follow_umask(self.staging)
        atomic.publish(self.staging, self.out)
        return finished


def run_fingerprint(stage_fingerprint: str, source: SafetensorsSource, calibration: torch.Tensor | None,
                    device: str, dtype: str) -> str:
    """What must match for a staging dir to be resumed: same options and input, same windows, same machine setup."""
    from spp_cli.environment import versions

    windows = None if calibration is None else hashlib.sha256(calibration.contiguous().numpy().tobytes()).hexdigest()
    content = {"stage": stage_fingerprint, "input": source.identity(), "windows": windows, "device": str(device),
               "dtype": dtype, "versions": versions()}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


__all__ = ["NotStreamable", "StreamingStore", "open_streamed_model", "run_fingerprint", "staging_path",
           "streamed_model", "wants_streaming"]

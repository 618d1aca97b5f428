"""A safetensors checkpoint read and written one tensor at a time (the streaming prune, prune_streaming.py).

`SafetensorsSource` maps every tensor name of a local model directory to its shard (from the shards' headers) and
reads the tensors asked for through memory-mapped `safe_open`, closing each file after use, so the process never
holds more of the input than the tensors it asked for.
`plan_output` decides, from a weightless model skeleton, exactly what `save_pretrained` would write: the same keys
(tied weights dropped, weight conversions reverted), in the same shards (huggingface_hub's splitter, same size
limit), with the same safetensors headers and `model.safetensors.index.json`. `ShardWriter` lays those shard
files out up front and writes each tensor's bytes at its planned offset, whenever it is ready and in any order,
so a block's pruned weights go straight to their final place and a resumed run rewrites only what was not done.
The files are byte-identical to save_pretrained's: safetensors orders a file's tensors by dtype (its Dtype enum,
largest first), then by name, and pads the JSON header with spaces to a multiple of 8 bytes.
`BackgroundWriter` is the one thread a streamed store keeps a finished block with (write, hash, inputs, state)
while the caller computes the next one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from pathlib import Path

import torch

from spp_cli.errors import BadInput
from spp_cli.io.safetensors_header import read_header

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_DTYPE_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.uint16: "U16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
    torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}  # in safetensors' Dtype enum order, which is the order (reversed) it lays a file's tensors out in
_DTYPE_RANK = {name: rank for rank, name in enumerate(_DTYPE_NAMES.values())}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class NotStreamable(Exception):
    """The model cannot be written tensor by tensor exactly like save_pretrained does (the reason is the text)."""


class SafetensorsSource:
    """The tensors of a local HF model directory: the shards its index names, or its single model.safetensors."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / INDEX_NAME
        if index.is_file():
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        else:
            files = [WEIGHTS_NAME]
        self.files = [directory / name for name in files]
        self.entries: dict[str, tuple[Path, torch.dtype, list[int]]] = {}  # name -> (file, dtype, shape)
        for path in self.files:
            for name, entry in read_header(path)[0].items():
                self.entries[name] = (path, _TORCH_DTYPES.get(entry["dtype"]), entry["shape"])

    @staticmethod
    def usable(directory: Path) -> bool:
        """A directory transformers would load from safetensors: an index of shards or one model.safetensors."""
        return (directory / INDEX_NAME).is_file() or (directory / WEIGHTS_NAME).is_file()

    def identity(self) -> list:
        """What tells one input from another without reading it: each shard's name, size and modification time."""
        return [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in self.files]

    def first_float_dtype(self) -> torch.dtype | None:
        return next((dtype for _, dtype, _ in self.entries.values() if dtype is not None and dtype.is_floating_point),
                    None)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """name -> tensor (CPU, stored dtype) for `names`; each shard is opened once and closed right after."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.entries[name][0], []).append(name)
        tensors = {}
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(name)
        return tensors


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # as written (the checkpoint's stored dtype for floating tensors)
    shard: str  # file name inside the output directory
    offset: int  # absolute byte offset of the tensor's data in its shard
    nbytes: int


@dataclass
class OutputPlan:
    tensors: dict[str, PlannedTensor]  # in save_pretrained's state-dict order
    shard_headers: dict[str, bytes]  # shard file name -> its first bytes (length prefix + padded JSON header)
    shard_sizes: dict[str, int]  # shard file name -> total bytes
    index: dict | None  # model.safetensors.index.json's content when sharded


RESUME_FILE = "resume.json"  # a streamed run's state in its staging folder (prune and merge)
LOCK_FILE = "lock"  # held while a process writes that folder


def write_resume_state(staging: Path, state: dict) -> None:
    """resume.json of a streamed run, replaced atomically: a kill leaves the old state or the new one."""
    temporary = staging / (RESUME_FILE + ".tmp")
    temporary.write_text(json.dumps(state), encoding="utf-8")
    os.replace(temporary, staging / RESUME_FILE)


class StagedRun:
    """What a streamed run (prune_streaming.StreamingStore, merge_streaming.StreamingMerge) does with its staging
    folder `staging`: hold its lock (flock: two live runs never share one), read the resume.json a killed run left,
    clear it for a fresh start, release it, or remove it."""

    staging: Path
    lock = None  # the lock file, open while this process holds it

    def _take_staging(self, busy: str) -> dict | None:
        """Create the folder and hold its lock (BadInput `busy` when another live run holds it); the resume state
        found there, or None."""
        self.staging.mkdir(parents=True, exist_ok=True)
        self.lock = (self.staging / LOCK_FILE).open("a")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.close()
            self.lock = None
            raise BadInput(busy) from None
        return self._read_state()

    def _read_state(self) -> dict | None:
        try:
            return json.loads((self.staging / RESUME_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _clear_staging(self) -> None:
        """Remove everything but the lock: a fresh start."""
        for entry in self.staging.iterdir():
            if entry.name != LOCK_FILE:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def close(self) -> None:
        """Release the lock; the staging folder stays (a rerun resumes from it)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def discard(self) -> None:
        """Remove the staging folder (a bad input found after it was opened: nothing is left behind)."""
        self.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def weightless_model(directory: Path, source: SafetensorsSource, dtype: str, trust_remote_code: bool = False):
    """The model of `directory` without weights (parameters on the meta device, buffers computed as usual) in the
    dtype from_pretrained(dtype=`dtype`) would load it in, tied, with the folder's generation config; in eval mode.
    BadInput (one line) when its config cannot be read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from spp_cli.errors import BadInput, first_line
    from spp_cli.io.checkpoint import torch_dtype

    compute_dtype = torch_dtype(dtype)
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
        if compute_dtype == "auto":  # what from_pretrained(dtype="auto") picks
            compute_dtype = getattr(config, "dtype", None) or source.first_float_dtype() or torch.float32
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise BadInput(f"could not load model '{directory}': {first_line(error)}") from None
    model.tie_weights()  # from_config leaves meta weights untied; the plan must see the ties save_pretrained sees
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


def in_memory_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors save_pretrained starts from, by their in-memory names: tied copies and ignored keys left out."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state_dict = model.state_dict()
    for ignored in model._keys_to_ignore_on_save or ():
        state_dict.pop(ignored, None)
    return remove_tied_weights_from_state_dict(state_dict, model)


def loaded_conversions(model, keys: list[str]) -> list:
    """The weight conversions from_pretrained would record on `model` loading a checkpoint with these `keys`: those
    of the model's conversion mapping that match one of them (renamings first, as loading applies them)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    from spp_cli.io.key_renames import converted_key, renamed_key

    mapping = get_model_conversion_mapping(model)
    renamings = [transform for transform in mapping if not isinstance(transform, WeightConverter)]
    used = []
    for transform in mapping:
        if isinstance(transform, WeightConverter):
            matches = any(converted_key(renamed_key(key, renamings), [transform])[1] is not None for key in keys)
        else:
            matches = any(renamed_key(key, [transform]) != key for key in keys)
        if matches:
            used.append(transform)
    return used


def saved_state_dict(model, conversions: list | None = None) -> dict[str, torch.Tensor]:
    """What save_pretrained would save from `model` (a skeleton is fine) had from_pretrained loaded it with these
    weight `conversions` recorded (loaded_conversions): the same steps, in the same order (which decides the shards).

    Without conversions (a checkpoint whose names need none), raises NotStreamable when saving renames weights."""
    from transformers.core_model_loading import revert_weight_conversion

    state_dict = in_memory_state_dict(model)
    model._weight_conversions = list(conversions or [])  # as from_pretrained records them
    reverted = revert_weight_conversion(model, dict(state_dict))  # (that makes the order dot-natural, as it does)
    if conversions is None and set(reverted) != set(state_dict):
        raise NotStreamable(f"{type(model).__name__} renames its weights when saved")
    return reverted


def plan_output(model, stored_dtype: torch.dtype, max_shard_size: str, conversions: list | None = None) -> OutputPlan:
    """Plan the output files of `model` (a skeleton: shapes are enough) saved in `stored_dtype`, loaded with weight
    `conversions` (saved_state_dict).

    Call before any weight is loaded into the skeleton: tied weights must still be tied (total_parameters)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state_dict = saved_state_dict(model, conversions)
    as_saved = {
        name: torch.empty(tensor.shape, dtype=stored_dtype if tensor.is_floating_point() else tensor.dtype,
                          device="meta")
        for name, tensor in state_dict.items()
    }
    split = split_torch_state_dict_into_shards(as_saved, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    planned: dict[str, PlannedTensor] = {}
    headers, sizes = {}, {}
    for shard, names in split.filename_to_tensors.items():
        order = sorted(names, key=lambda name: (-_DTYPE_RANK[_DTYPE_NAMES[as_saved[name].dtype]], name))
        header: dict = {"__metadata__": {"format": "pt"}}
        begin = 0
        for name in order:
            tensor = as_saved[name]
            nbytes = tensor.numel() * tensor.element_size()
            header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [begin, begin + nbytes]}
            begin += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        headers[shard] = len(text).to_bytes(8, "little") + text
        sizes[shard] = len(headers[shard]) + begin
        for name in order:
            start, end = header[name]["data_offsets"]
            planned[name] = PlannedTensor(name, tuple(as_saved[name].shape), as_saved[name].dtype, shard,
                                          len(headers[shard]) + start, end - start)
    index = None
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
    return OutputPlan({name: planned[name] for name in state_dict}, headers, sizes, index)


class ShardWriter:
    """Writes planned tensors into their shard files in `directory`, at their offsets, in any order."""

    def __init__(self, directory: Path, plan: OutputPlan) -> None:
        self.directory = directory
        self.plan = plan

    def laid_out(self) -> bool:
        """True when every shard file exists with its planned header and size (a run to resume)."""
        for shard, header in self.plan.shard_headers.items():
            path = self.directory / shard
            if not path.is_file() or path.stat().st_size != self.plan.shard_sizes[shard]:
                return False
            with path.open("rb") as handle:
                if handle.read(len(header)) != header:
                    return False
        return True

    def lay_out(self) -> None:
        """Create every shard file: its header, then its full size (sparse until the tensors are written)."""
        for shard, header in self.plan.shard_headers.items():
            with (self.directory / shard).open("wb") as handle:
                handle.write(header)
                handle.truncate(self.plan.shard_sizes[shard])

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write each tensor (already in its planned dtype and shape) at its planned place."""
        for shard in {self.plan.tensors[name].shard for name in tensors}:
            descriptor = os.open(self.directory / shard, os.O_WRONLY)
            try:
                for name, tensor in tensors.items():
                    spot = self.plan.tensors[name]
                    if spot.shard != shard:
                        continue
                    if tensor.dtype != spot.dtype or tuple(tensor.shape) != spot.shape:
                        raise ValueError(f"{name}: {tensor.dtype} {tuple(tensor.shape)} is not the planned "
                                         f"{spot.dtype} {spot.shape}")
                    data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
                    written = 0
                    while written < spot.nbytes:  # pwrite may write less than asked
                        written += os.pwrite(descriptor, data[written:], spot.offset + written)
            finally:
                os.close(descriptor)

    def write_index(self) -> None:
        if self.plan.index is not None:
            text = json.dumps(self.plan.index, indent=2, sort_keys=True) + "\n"
            (self.directory / INDEX_NAME).write_text(text, encoding="utf-8")


class BackgroundWriter:
    """Jobs run one at a time, in the order given, on one background thread: a streamed store keeps block i (writes,
    hashes, saves the next inputs, replaces resume.json) while the caller computes block i + 1.

    `start` first waits for every earlier job, so at most one block's job is in flight (a queue of depth 1: the
    buffers a job reads may be reused once the next one starts), and a job's failure surfaces in the caller's
    thread at the next `start` or `wait`, as the very exception the job raised (a full disk stays a full disk).
    `then` queues a job behind the others without waiting (a block's event, once the block is kept). Once a job
    failed, the jobs after it are skipped."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._futures: list[Future] = []
        self._failed = False

    def start(self, job: Callable[[], None]) -> None:
        self.wait()
        self.then(job)

    def then(self, job: Callable[[], None]) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spp-writer")
        self._futures.append(self._executor.submit(self._run, job))

    def _run(self, job: Callable[[], None]) -> None:
        if self._failed:
            return
        try:
            job()
        except BaseException:
            self._failed = True
            raise

    def wait(self) -> None:
        """Return once every job queued so far has run; raise the first failure among them."""
        futures, self._futures = self._futures, []
        wait_for(futures)
        for future in futures:
            future.result()

    def close(self) -> None:
        """Wait for the queued jobs, keeping quiet about their failures (the caller already waited, or is failing
        for another reason), and end the thread."""
        try:
            self.wait()
        except Exception:  # noqa: S110 (a KeyboardInterrupt still propagates)
            pass
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

"""Where an evaluated model lives: one device (the default), or spread by accelerate's big-model inference.

`--device-map auto|balanced|balanced_low_0|sequential` loads the model with
`from_pretrained(device_map=..., max_memory=..., offload_folder=...)`: accelerate fills the GPUs (in index order),
then the CPU, then the disk, each up to its `--max-memory` budget, and moves each block's weights to its
execution device as the forward reaches it. The arithmetic is the same as on one device (the same kernels on the
same dtype), so the options are not part of the results' fingerprint; each model's "applied" record says where its
modules went.

--max-memory: comma-separated DEVICE=SIZE pairs, e.g. `0=20GiB,1=20GiB,cpu=64GiB` (a recipe may also give
accelerate's mapping, {0: 20GiB, cpu: 64GiB}). DEVICE is a GPU index (or cuda:N), cpu or mps; SIZE a byte
count or a number with B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024). Only the devices
named are used (the disk always takes the rest). Torch-free at import: the recipe schema parses these values.
"""

from __future__ import annotations

import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
MAX_MEMORY_TEXT = ("DEVICE=SIZE pairs such as 0=20GiB,cpu=64GiB (DEVICE: a GPU index, cuda:N, cpu or mps), "
                   "or in a recipe the mapping {0: 20GiB, cpu: 64GiB}")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)", re.IGNORECASE)


def _device_key(text: str) -> int | str | None:
    """0, "cuda:0" -> 0; "cpu", "mps" -> themselves; anything else None."""
    text = text.strip().lower()
    if text.startswith("cuda:"):
        text = text[len("cuda:"):]
    if text.isdigit():
        return int(text)
    return text if text in ("cpu", "mps") else None


def _size_bytes(text: str) -> int | None:
    match = _SIZE.fullmatch(text.strip())
    if not match or match[2].lower() not in _UNITS:
        return None
    return int(float(match[1]) * _UNITS[match[2].lower()])


def _budgets(value: Any) -> dict[int | str, tuple[int, str]]:
    """device key -> (bytes, the size as written); ValueError with the problem in words."""
    if isinstance(value, dict):
        pairs = [(str(key), str(size)) for key, size in value.items()]
    elif isinstance(value, str):
        pairs = [part.partition("=")[::2] for part in value.split(",") if part.strip()]
    else:
        raise ValueError(f"{value!r} is not {MAX_MEMORY_TEXT}")
    if not pairs:
        raise ValueError(f"empty; use {MAX_MEMORY_TEXT}")
    budgets: dict[int | str, tuple[int, str]] = {}
    for device, size in pairs:
        device, size = device.strip(), size.strip()
        key, count = _device_key(device), _size_bytes(size)
        if key is None:
            raise ValueError(f"device {device!r} is unknown: use a GPU index (0, 1, ... or cuda:N), cpu or mps "
                             "(e.g. 0=20GiB,cpu=64GiB)")
        if count is None or count <= 0:
            raise ValueError(f"{size!r} for device {device} is not a size: use e.g. 20GiB, 512MB or a byte count")
        if key in budgets:
            raise ValueError(f"device {device} is given twice: give each device once")
        budgets[key] = (count, size.replace(" ", ""))
    gpus = sorted(key for key in budgets if isinstance(key, int))
    return {key: budgets[key] for key in [*gpus, *(key for key in ("mps", "cpu") if key in budgets)]}


def parse_max_memory(value: Any) -> dict[int | str, int]:
    """A --max-memory value (the DEVICE=SIZE,... string or a mapping) -> accelerate's {0: bytes, "cpu": bytes},
    GPUs first. Raises ValueError with the problem in words (the schema turns it into a one-line BadInput)."""
    return {key: count for key, (count, _) in _budgets(value).items()}


def normalise_max_memory(value: Any) -> str:
    """The canonical spelling of a --max-memory value: devices in accelerate's order, cuda:N as N, sizes as
    written (`cuda:1=20GiB, cpu=200MB,0=1GB` -> `0=1GB,1=20GiB,cpu=200MB`)."""
    return ",".join(f"{key}={size}" for key, (_, size) in _budgets(value).items())


def gpu_budgets(max_memory: str | None) -> list[int]:
    """The GPU indices a canonical --max-memory names."""
    return [key for key in parse_max_memory(max_memory) if isinstance(key, int)] if max_memory else []


def placement_problem(device_map: str | None, max_memory: str | None, offload_folder: str | None,
                      device: str | None) -> tuple[str, str] | None:
    """(key, problem and fix) when the eval placement options contradict each other, else None."""
    if device_map is None:
        key = "max_memory" if max_memory is not None else "offload_folder" if offload_folder is not None else None
        return key and (key, "applies only with a device map: add device_map auto (--device-map auto) or drop it")
    if device not in (None, "auto", "cpu"):
        return "device", (f"{device} and a device map both place the model: drop the device (or make it cpu to keep "
                          "the model off the GPUs) and choose the GPUs with max_memory, e.g. 0=20GiB,cpu=64GiB")
    if device == "cpu" and gpu_budgets(max_memory):
        return "max_memory", f"{max_memory} names a GPU, but the device is cpu: drop the GPU budgets or the device"
    return None


def device_map_budgets(max_memory: str | None, device: str) -> dict[int | str, int] | None:
    """accelerate's max_memory for a --device-map run: the --max-memory budgets; else, with --device cpu, the CPU's
    free memory alone (so no GPU is used); else None (accelerate takes every device's free memory)."""
    if max_memory is not None:
        return parse_max_memory(max_memory)
    if device == "cpu":
        import psutil

        return {"cpu": psutil.virtual_memory().available}
    return None


@contextmanager
def placed_model(path: str, *, device_map: str | None, max_memory: str | None, offload_folder: str | None,
                 device: str, dtype: str | None, trust_remote_code: bool, allow_pickle: bool):
    """(model, tokenizer, placement record) for the evaluation of `path`.

    Without a device map: the whole model on `device`, and the record is {}. With one: loaded by accelerate's
    big-model inference over the devices `max_memory` allows (see device_map_budgets), weights that do not fit
    read from disk as the forward reaches them. Weights that must be re-saved to be offloaded (pickle checkpoints,
    fused MoE experts) go to a scratch folder spp-offload-* inside `offload_folder` (default: the system's temporary
    folder), removed when the evaluation of this model ends. The record: {"device_map", "max_memory",
    "offload_folder", "modules": {device: how many of the map's modules run there}}.
    """
    from spp_cli.io.checkpoint import load_model

    if device_map is None:
        yield (*load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                           allow_pickle=allow_pickle), {})
        return
    created = offload_folder is not None and not Path(offload_folder).exists()
    if offload_folder is not None:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="spp-offload-", dir=offload_folder) as scratch:
            placement = {"device_map": device_map, "max_memory": device_map_budgets(max_memory, device),
                         "offload_folder": scratch}
            model, tokenizer = load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                          allow_pickle=allow_pickle, placement=placement)
            modules: dict[str, int] = {}
            for where in model.hf_device_map.values():
                modules[str(where)] = modules.get(str(where), 0) + 1
            yield model, tokenizer, {"device_map": device_map, "max_memory": max_memory,
                                     "offload_folder": offload_folder, "modules": modules}
    finally:  # a folder spp made for the scratch goes with it; the user's own folder stays
        if created and not any(Path(offload_folder).iterdir()):
            Path(offload_folder).rmdir()


def input_device(model):
    """Where a forward's inputs go: the model's device; for a model spread by a device map, the embedding's device
    (accelerate's hooks move every block's inputs on from there), the CPU when the embedding itself is offloaded."""
    import torch

    if getattr(model, "hf_device_map", None) is None:
        return next(model.parameters()).device
    weight = model.get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device

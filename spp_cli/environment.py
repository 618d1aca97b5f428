"""Versions, devices and cache locations: recorded in every manifest and shown by `spp env`."""

import os
import platform
import sys
from importlib import metadata


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def is_offline() -> bool:
    """The one offline rule: any Hugging Face offline switch set (1, on, yes, true) means nothing is downloaded."""
    return any(os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"} for name in OFFLINE_VARIABLES)


def versions() -> dict:
    """The versions that decide a stage's numbers (kept in spp.json and results.json)."""
    import torch
    import transformers

    return {"spp": package_version("spp"), "torch": torch.__version__, "transformers": transformers.__version__}


def resolve_device(device: str | None) -> str:
    """`auto` -> the first CUDA GPU when there is one, else the CPU."""
    import torch

    from spp_cli.errors import BadInput
    from spp_cli.vocabulary import DEVICE_PATTERN, DEVICE_TEXT

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not DEVICE_PATTERN.fullmatch(device):
        raise BadInput(f"unknown device '{device}': use {DEVICE_TEXT}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"device '{device}' asked for, but no CUDA GPU is visible: use --device cpu")
    return device


def environment_report() -> dict:
    import torch

    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    cache = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {
            name: package_version(name)
            for name in ("spp", "torch", "transformers", "datasets", "lm_eval", "peft", "accelerate", "typer")
        },
        "cuda_available": torch.cuda.is_available(),
        "devices": devices or ["cpu"],
        "cpu_threads": torch.get_num_threads(),
        "hf_cache": cache,
        "spp_cache": os.environ.get("SPP_CACHE", os.path.expanduser("~/.cache/spp")),
        "offline": is_offline(),
    }

"""What the evaluation code needs to know about the Hugging Face Hub: whether this run is offline, and which
exceptions mean "a dataset could not be fetched" (turned into BadInput naming the local alternative)."""

from __future__ import annotations

import os

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def is_offline() -> bool:
    """True when the Hugging Face offline switches are set (then nothing is downloaded)."""
    return any(os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"} for name in _OFFLINE_VARIABLES)


def download_errors() -> tuple[type[BaseException], ...]:
    """What `datasets`/`huggingface_hub` raise when a dataset cannot be fetched (offline, no network, not found)."""
    import datasets
    import huggingface_hub.errors

    errors = [ConnectionError, datasets.exceptions.DatasetNotFoundError, huggingface_hub.errors.LocalEntryNotFoundError]
    for module_name, class_name in (("requests", "ConnectionError"), ("httpx", "TransportError")):
        try:
            errors.append(getattr(__import__(module_name), class_name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)

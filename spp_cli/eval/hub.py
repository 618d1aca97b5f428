"""What the evaluation code needs to know about the Hugging Face Hub: which exceptions mean "a dataset could not
be fetched" (turned into BadInput naming the local alternative). Whether a run is offline is the one rule in
spp_cli/environment.py."""

from __future__ import annotations


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

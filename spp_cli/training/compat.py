"""What differs between the transformers releases spp runs on (pyproject: transformers>=5.0,<6), in one place.

The GPU image of the device check (scripts/gpu_check.sh) has transformers 5.17; the development venv 5.2x.
"""

from __future__ import annotations

import dataclasses


def checkpointing_arguments(enabled: bool) -> dict:
    """TrainingArguments keywords for activation checkpointing, non-reentrant (it works with a frozen embedding),
    under the name this transformers reads: `activation_checkpointing` from 5.2x on (where `gradient_checkpointing`
    is a deprecated alias), `gradient_checkpointing` before (5.17 has no `activation_checkpointing` field)."""
    from transformers import TrainingArguments

    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: enabled, f"{key}_kwargs": {"use_reentrant": False} if enabled else None}

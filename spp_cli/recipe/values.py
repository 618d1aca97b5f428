"""One recipe value checked against its schema Option (spp_cli/recipe/schema.py) and normalised; the hints the
errors give ("did you mean ...?"). Used by spp_cli/recipe/resolve.py for recipe keys, overrides and CLI flags alike."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from typing import Any

from spp_cli.recipe.schema import Fail, Option
from spp_cli.vocabulary import DEVICE_PATTERN

__all__ = ["coerce", "did_you_mean", "show"]

_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


def show(value: Any) -> str:
    """A value as the user wrote it in YAML: 'text', 0.5, true, null."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value)
    return json.dumps(value, default=str)


_KEY_ALIASES = {  # names people bring from other tools -> ours
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "steps": "max_steps",
    "num_samples": "nsamples",
    "n_samples": "nsamples",
    "calibration": "calib",
    "calib_data": "calib",
    "seq_len": "seqlen",
    "max_seq_len": "seqlen",
    "max_length": "seqlen",
    "sequence_length": "seqlen",
    "per_device_train_batch_size": "micro_batch_size",
    "model_name_or_path": "model",
    "output": "output_dir",
    "out": "output_dir",
    "lora_dropout": "dropout",
    "dataset": "data",
    "sparsity_ratio": "sparsity",
    "prune_method": "method",
    "eval_tasks": "tasks",
    "model": "models",
}


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    normal = word.replace("-", "_").lower()
    guess = _KEY_ALIASES.get(normal) if _KEY_ALIASES.get(normal) in candidates else None
    guess = guess or (normal if normal in candidates else None)
    guess = guess or next(iter(difflib.get_close_matches(normal, candidates, n=1, cutoff=0.6)), None)
    return f"; did you mean {guess!r}?" if guess else ""


def coerce(value: Any, option: Option, fail: Fail) -> Any:
    """Checks one value against its Option and returns it normalised; `fail(message)` raises."""
    allowed = option.allowed()
    if value is None:
        if option.nullable:
            return None
        fail(f"null is not allowed; use {allowed}")
    kind = option.kind
    if kind == "expect":  # the recipe's pinned results: a nested mapping, checked where it is used
        from spp_cli.expectations import parse_expectations

        return parse_expectations(value, fail)
    if kind == "max_memory":  # accelerate's budgets: "0=20GiB,cpu=64GiB" or a mapping, kept in one spelling
        from spp_cli.eval.placement import normalise_max_memory

        try:
            return normalise_max_memory(value)
        except ValueError as error:
            fail(str(error))
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        fail(f"{show(value)} is not true or false")
    if kind in ("int", "float"):
        if isinstance(value, bool):  # bool is an int subclass: `sparsity: yes` must not become 1
            fail(f"{show(value)} is a boolean, not a number; use {allowed}")
        if not isinstance(value, (int, float)):
            fail(f"{show(value)} is not a number; use {allowed}")
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                fail(f"{show(value)} is not an integer; use {allowed}")
            value = int(value)
        if not option.in_range(value):
            fail(f"{show(value)} is out of range; use {allowed}")
        return float(value) if kind == "float" else value
    if kind == "list":
        items = [part.strip() for part in value.split(",")] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(i, str) and i.strip() for i in items):
            fail(f"{show(value)} is not {allowed}")
        return [item.strip() for item in items]
    if option.choices:
        if isinstance(value, bool) and {"yes", "no"} <= set(option.choices):
            value = "yes" if value else "no"  # YAML 1.1 reads a bare `bos: no` as false
        if value not in option.choices:
            suggestion = did_you_mean(value, option.choices) if isinstance(value, str) else ""
            fail(f"{show(value)} is not {allowed}{suggestion}")
        return value
    if kind == "pattern" and isinstance(value, int) and not isinstance(value, bool):
        fail(
            f'{value} is a number; write the pattern as a quoted string such as "2:4" '
            "(YAML 1.1 reads a bare 2:4 as 124)"
        )
    if not isinstance(value, str):
        quote = " (quote it to keep it as text)" if isinstance(value, (int, float)) else ""
        fail(f"{show(value)} is not a string; use {allowed}{quote}")
    if not value.strip():
        fail(f"empty; use {allowed}")
    value = value.strip()
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as error:
            fail(f"{show(value)} is not a valid regular expression ({error})")
    if kind == "device" and not DEVICE_PATTERN.fullmatch(value):
        fail(f"{show(value)} is not {allowed}")
    if kind == "pattern":
        return _normalise_pattern(value, fail)
    return value


def _normalise_pattern(text: str, fail: Fail) -> str:
    """'unstructured' or 'N:M' with 0 < N < M -> its canonical spelling ("unstructured", "2:4")."""
    if text.lower() == "unstructured":
        return "unstructured"
    match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
    if not match:
        fail(f"{show(text)} is not unstructured or N:M (e.g. 2:4)")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        fail(f"N:M {n}:{m} is invalid; need 0 < N < M (e.g. 2:4)")
    return f"{n}:{m}"

"""A finetune stage's `sweep:`: the stage written once, run at every combination of a few values.

    - name: spp
      type: finetune
      method: spp
      sweep: {lr: [1.3e-3, 4e-3, 1.2e-2], seed: [0, 1]}

becomes six finetune stages named after their values, spp-lr13e-4-seed0 ... spp-lr12e-3-seed1 (the numbers
written without a dot, since a dot separates an override's key path), each validated like a stage written out.
An eval stage's `models:` that names `spp` evaluates all six; no stage may read the sweep as its one `input`.
`spp report` picks the values of every key but `seed` on the held-out loss (mean over seeds) and reports the test
figures of that pick as mean ± half-range over the seeds (spp_cli/report_sweep.py). Pure Python (no torch).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from decimal import Decimal
from typing import Any, NoReturn

from spp_cli.recipe.schema import COMMAND_KEYS, FinetuneStage, Recipe, schema_fields
from spp_cli.recipe.values import coerce, did_you_mean, show

REPLICATE_KEY = "seed"  # a sweep's replicates: every other key is a choice the held-out split decides
EXAMPLE = "{lr: [1e-3, 3e-3], seed: [0, 1]}"
_NAME_PART = re.compile(r"[A-Za-z0-9_-]+")


def take_sweeps(raw_stages: list, fail_for) -> dict[int, tuple[Any, set[str]]]:
    """Remove each stage's `sweep:` from the raw recipe data (in place); returns index -> (the sweep as written,
    the keys the stage sets itself). `fail_for(index)` gives that stage's fail(message, key)."""
    sweeps = {}
    for index, raw in enumerate(raw_stages):
        if isinstance(raw, dict) and "sweep" in raw:
            if raw.get("type") != "finetune":
                fail_for(index)("applies to finetune stages only: drop it", "sweep")
            sweeps[index] = (raw.pop("sweep"), set(raw))
    return sweeps


def expand_sweeps(recipe: Recipe, sweeps: dict[int, tuple[Any, set[str]]], fail_for) -> None:
    """Replace each swept stage of the resolved `recipe` by its members (in place), fill recipe.sweeps (name ->
    [{"stage", "values"}]) and point the eval stages' model lists at the members."""
    stages, made_by = [], {}
    for index, stage in enumerate(recipe.stages):
        if index not in sweeps:
            stages.append(stage)
            continue
        members = _members(stage, *sweeps[index], fail_for(index))
        recipe.sweeps[stage.name] = [{"stage": member.name, "values": values} for member, values in members]
        stages += [member for member, _ in members]
        made_by.update({member.name: index for member, _ in members})
    names = [stage.name for stage in stages]
    for name, index in made_by.items():
        if names.count(name) > 1:
            fail_for(index)(f"makes a stage named {name!r} twice or one another stage has: rename it or give "
                            "values that differ in their first 3 digits", "sweep")
    for index, stage in enumerate(recipe.stages):
        if stage.TYPE == "eval":
            stage.models = [m["stage"] for name in stage.models for m in recipe.sweeps.get(name, [{"stage": name}])]
            if stage.input in recipe.sweeps:
                stage.input = recipe.sweeps[stage.input][-1]["stage"]
        elif stage.input in recipe.sweeps:
            fail_for(index)(f"reads {stage.input!r}, a sweep of {len(recipe.sweeps[stage.input])} stages: name one "
                            f"of them ({recipe.sweeps[stage.input][0]['stage']}, ...) as input", "input")
    recipe.stages = stages


def _members(stage: FinetuneStage, raw: Any, set_keys: set[str], fail) -> list[tuple[FinetuneStage, dict]]:
    """(stage, its swept values) for every combination of the grid, each checked like a stage written out."""
    grid = _grid(raw, set_keys, fail)
    members = []
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination, strict=True))
        name = "-".join([stage.name, *(f"{key}{_name_part(value, key, fail)}" for key, value in values.items())])
        member = dataclasses.replace(stage, name=name, **values)

        def member_fail(message: str, key: str | None = None, show_key: bool = True, values=values) -> NoReturn:
            fail(f"at {', '.join(f'{k} {show(v)}' for k, v in values.items())}: "
                 f"{key + ': ' if key and show_key else ''}{message}", "sweep")

        member.check(member_fail)
        members.append((member, values))
    choices = [key for key in grid if key != REPLICATE_KEY and len(grid[key]) > 1]
    if choices and stage.val_size == 0:
        fail(f"picks {' and '.join(choices)} on the held-out loss, which val_size 0 leaves empty: drop val_size 0",
             "sweep")
    return members


def _grid(raw: Any, set_keys: set[str], fail) -> dict[str, list]:
    """The sweep's keys and their values, each value checked against the key's schema entry."""
    if not isinstance(raw, dict) or not raw:
        fail(f"{show(raw)} is not allowed; use a mapping of option: [values], e.g. {EXAMPLE}", "sweep")
    fields = {f.name: f.metadata["spp"] for f in schema_fields(FinetuneStage) if f.name not in COMMAND_KEYS}
    grid = {}
    for key, values in raw.items():
        if key not in fields:
            fail(f"unknown key {key!r}{did_you_mean(str(key), list(fields))} (a finetune option)", "sweep")
        if key in set_keys:
            fail(f"{key} is set on the stage and swept: drop one of them", "sweep")
        if not isinstance(values, list) or not values:
            fail(f"{key}: {show(values)} is not allowed; use a non-empty list of values, e.g. {EXAMPLE}", "sweep")
        checked = [coerce(value, fields[key], lambda message, key=key: fail(f"{key}: {message}", "sweep"))
                   for value in values]
        if len(set(map(repr, checked))) < len(checked):
            fail(f"{key}: {show(values)} lists a value twice; list each once", "sweep")
        grid[key] = checked
    return grid


def _name_part(value: Any, key: str, fail) -> str:
    """A value as a stage-name part: 0.004 -> 4e-3, 0.0133 -> 133e-4, 3 -> 3, true -> true, text as written."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        sign, digits, exponent = Decimal(f"{value:.3g}").normalize().as_tuple()
        mantissa = ("-" if sign else "") + "".join(map(str, digits))
        return mantissa + "0" * exponent if 0 <= exponent <= 3 else f"{mantissa}e{exponent}"
    text = str(value)
    if not _NAME_PART.fullmatch(text):
        fail(f"{key}: {show(value)} cannot be part of a stage name; use letters, digits, _ and -", "sweep")
    return text

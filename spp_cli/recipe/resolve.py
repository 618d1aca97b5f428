"""Recipes: the YAML file `spp run` executes (DESIGN.md, Recipe).

A recipe names a model, an output folder and a list of typed stages (prune, finetune, eval). This module reads it
with a YAML loader that avoids YAML 1.1's traps (spp_cli/recipe/loader.py), applies `key.path=value` overrides,
checks every key against the schema tables (spp_cli/recipe/schema.py, values by spp_cli/recipe/values.py; errors
are one line naming the key path and what is allowed), and fills in defaults, stage references and absolute paths.
Pure Python (no torch), so `spp run --dry-run` answers at once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from spp_cli.data.formats import json_kind
from spp_cli.errors import BadInput
from spp_cli.recipe.loader import RecipeLoader, parse_yaml
from spp_cli.recipe.schema import (
    COMMAND_KEYS,
    DATASET_NAMES,
    STAGE_TYPES,
    EvalStage,
    Fail,
    FinetuneStage,
    Option,
    PruneStage,
    Recipe,
    Stage,
    schema_fields,
)
from spp_cli.recipe.sweep import expand_sweeps, take_sweeps
from spp_cli.recipe.values import coerce, did_you_mean, show

__all__ = [
    "EvalStage",
    "FinetuneStage",
    "PruneStage",
    "Recipe",
    "RecipeLoader",
    "Stage",
    "dump_resolved",
    "load_recipe",
    "parse_recipe",
    "parse_yaml",
]

# ---------------------------------------------------------------------------------------------- validation

_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class _Reporter:
    """Raises BadInput as `<where>: <key path>: <problem and fix>`, where is the file or the override."""

    def __init__(self, source: str, origins: dict[tuple[int | None, str], str]):
        self.source = source
        self.origins = origins  # (stage index or None, key) -> the override that set it

    def fail(
        self, message: str, index: int | None = None, key: str | None = None, label: str = "", show_key: bool = True
    ) -> NoReturn:
        origin = self.origins.get((index, key or ""))
        where = f"override {origin}" if origin else self.source
        path = "" if index is None else f"stages[{index}]" + (f" ({label})" if label else "")
        if key and show_key:
            path = f"{path}.{key}" if path else key
        raise BadInput(f"{where}: {path}: {message}" if path else f"{where}: {message}")

    def for_stage(self, index: int, label: str) -> Callable[..., NoReturn]:
        """fail(message, key=None, show_key=True) for stages[index]."""

        def fail(message: str, key: str | None = None, show_key: bool = True) -> NoReturn:
            self.fail(message, index, key, label, show_key)

        return fail


def _unknown_keys(raw: dict, allowed: Sequence[str], fail: Fail, other_owner: dict[str, str]) -> None:
    for key in raw:
        if key not in allowed:
            hint = did_you_mean(str(key), allowed)
            if not hint and key in other_owner:
                hint = f"; {key!r} is a key of {other_owner[key]}"
            fail(f"unknown key {key!r}{hint} (allowed: {', '.join(allowed)})", key)


def _read_fields(cls: type, raw: dict, fail: Fail, skip: Sequence[str] = ()) -> dict[str, Any]:
    values = {}
    for f in schema_fields(cls):
        if f.name in skip:
            continue
        option: Option = f.metadata["spp"]
        if f.name not in raw:
            if option.required:
                fail(f"missing; use {option.allowed()}", f.name)
            continue
        values[f.name] = coerce(raw[f.name], option, lambda message, key=f.name: fail(message, key))
    return values


def _owners() -> dict[str, str]:
    """key -> which sections have it, for 'unknown key' hints."""
    owners: dict[str, list[str]] = {}
    for section, cls in [("the recipe's top level", Recipe)] + [(f"{t} stages", c) for t, c in STAGE_TYPES.items()]:
        for f in schema_fields(cls):
            owners.setdefault(f.name, []).append(section)
    return {key: " and ".join(sections) for key, sections in owners.items()}


# ---------------------------------------------------------------------------------------------- paths

_PATH_SUFFIXES = (".json", ".jsonl", ".txt", ".yaml", ".yml")


def _local_path(value: str, base: Path) -> str | None:
    """`value` as an absolute path when it looks like a local path, else None (builtin:, hf:, hub ids, datasets)."""
    if value in DATASET_NAMES or value == "dense":
        return None
    if re.match(r"[A-Za-z][\w+.-]*:", value) and not re.match(r"[A-Za-z]:[\\/]", value):
        return None  # builtin:NAME, hf:ORG/NAME, ppl:SOURCE
    if value.startswith("~"):
        return os.path.expanduser(value)
    if os.path.isabs(value):
        return os.path.normpath(value)
    if value.startswith(("./", "../")) or value.endswith(_PATH_SUFFIXES) or (base / value).exists():
        return os.path.abspath(base / value)
    return None


def _resolve_reference(value: str, index: int, stages: list[Stage], base: Path, fail: Fail, key: str) -> str:
    """A model reference in stages[index].key: dense, an earlier prune/finetune stage, a path or a hub id."""
    names = [stage.name for stage in stages]
    if value == "dense":
        return value
    if value in names:
        position = names.index(value)
        if position == index:
            fail(f"{value!r} is this stage itself; use dense or an earlier stage", key)
        if position > index:
            fail(
                f"{value!r} names a later stage (stages[{position}]); a stage can only read dense or an earlier stage",
                key,
            )
        if stages[position].TYPE == "eval":
            fail(f"{value!r} is an eval stage and writes no model; use dense or a prune/finetune stage", key)
        return value
    path = _local_path(value, base)
    if path is not None:
        return path
    if "/" in value or ":" in value:
        return value  # a hub id (org/name) or builtin:NAME
    earlier = ", ".join(["dense", *(stage.name for stage in stages[:index] if stage.TYPE != "eval")])
    fail(
        f"{value!r} is not a stage, a local folder or a hub id{did_you_mean(value, names[:index])} "
        f"(earlier models: {earlier})",
        key,
    )


# ---------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override, validate and resolve a recipe file. Raises BadInput with one line naming the key path.

    overrides: "stages.<name>.<key>=value" or "<key>=value"; values parse as YAML scalars with RecipeLoader.
    Relative paths in the file resolve against the file's folder; those given in overrides against the
    current directory.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{source}: no such recipe file; check the path") from None
    except IsADirectoryError:
        raise BadInput(f"{source}: is a folder; pass the recipe's .yaml file") from None
    except UnicodeDecodeError:
        raise BadInput(f"{source}: is not UTF-8 text; save the recipe as UTF-8") from None
    return parse_recipe(
        parse_yaml(text, source), base_dir=path.parent, source=source, stem=path.stem, overrides=overrides
    )


def parse_recipe(
    data: Any,
    *,
    base_dir: str | Path = ".",
    source: str = "recipe",
    stem: str = "recipe",
    overrides: Sequence[str] = (),
) -> Recipe:
    """Validate and resolve recipe data already read from YAML (see load_recipe)."""
    if not isinstance(data, dict):
        got = "nothing (the file is empty)" if data is None else json_kind(data)
        raise BadInput(f"{source}: expected a mapping with model: and stages: at the top level, got {got}")
    data = dict(data)  # overrides must not change the caller's data
    if isinstance(data.get("stages"), list):
        data["stages"] = [dict(stage) if isinstance(stage, dict) else stage for stage in data["stages"]]
    origins = _apply_overrides(data, overrides)
    report = _Reporter(source, origins)
    owners = _owners()

    def top_fail(message: str, key: str | None = None) -> NoReturn:
        report.fail(message, key=key)

    # top-level keys named x-... are the author's own (YAML anchors for stages to share, as compose files do)
    data = {key: value for key, value in data.items() if not str(key).startswith("x-")}
    _unknown_keys(
        data,
        [f.name for f in schema_fields(Recipe)],
        lambda message, key: report.fail(message, key=key, show_key=False),
        owners,
    )
    top = _read_fields(Recipe, data, top_fail, skip=("stages",))
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        top_fail(
            f"{'missing' if raw_stages is None else show(raw_stages) + ' is not allowed'}; "
            f"use {Recipe.__dataclass_fields__['stages'].metadata['spp'].allowed()}",
            "stages",
        )
    stage_fail = {index: report.for_stage(index, raw.get("name") or raw.get("type") or "")
                  for index, raw in enumerate(raw_stages) if isinstance(raw, dict)}
    sweeps = take_sweeps(raw_stages, stage_fail.get)  # a finetune stage's sweep: (spp_cli/recipe/sweep.py)
    stages = [_read_stage(raw, index, report, owners) for index, raw in enumerate(raw_stages)]

    cwd = Path.cwd()
    base = Path(base_dir)

    def base_for(index: int | None, key: str) -> Path:
        return cwd if (index, key) in origins else base

    top["output_dir"] = _dir_path(top.get("output_dir") or f"runs/{stem}", base_for(None, "output_dir"))
    top["model"] = _local_path(top["model"], base_for(None, "model")) or top["model"]
    recipe = Recipe(**top, stages=stages)
    _resolve_stages(recipe, report, base_for)
    expand_sweeps(recipe, sweeps, lambda index: report.for_stage(index, recipe.stages[index].name))
    return recipe


def _dir_path(value: str, base: Path) -> str:
    return os.path.abspath(base / os.path.expanduser(value))


def _read_stage(raw: Any, index: int, report: _Reporter, owners: dict[str, str]) -> Stage:
    if not isinstance(raw, dict):
        report.fail(f"expected a mapping with type: prune, finetune or eval, got {show(raw)}", index)
    kind = raw.get("type")
    if kind not in STAGE_TYPES:
        message = "missing; use" if kind is None else f"{show(kind)} is not"
        hint = did_you_mean(kind, list(STAGE_TYPES)) if isinstance(kind, str) else ""
        report.fail(f"{message} one of {', '.join(STAGE_TYPES)}{hint}", index, "type")
    cls = STAGE_TYPES[kind]
    fail = report.for_stage(index, raw["name"] if isinstance(raw.get("name"), str) and raw["name"] else kind)

    keys = ["name", "type", *(f.name for f in schema_fields(cls) if f.name != "name")]
    _unknown_keys(raw, keys, lambda message, key: fail(message, key, show_key=False), owners)
    stage = cls(**_read_fields(cls, raw, fail))
    stage.name = stage.name or kind
    if stage.name == "dense":
        fail("'dense' is reserved for the recipe's model; pick another name", "name")
    if not _STAGE_NAME.fullmatch(stage.name):
        fail(
            f"{show(stage.name)} is not a valid stage name; use letters, digits, _ and - "
            "(it names the folder <output_dir>/<name>)",
            "name",
        )
    stage.check(fail)
    return stage


def _resolve_stages(recipe: Recipe, report: _Reporter, base_for: Callable[[int | None, str], Path]) -> None:
    """Fill defaults that depend on other stages or the top level; check references; make paths absolute."""
    first_use: dict[str, int] = {}
    previous_model = "dense"
    for index, stage in enumerate(recipe.stages):
        fail = report.for_stage(index, stage.name)
        if stage.name in first_use:
            fail(
                f"{stage.name!r} is already used by stages[{first_use[stage.name]}]; give each stage a unique name",
                "name",
            )
        first_use[stage.name] = index
        for f in schema_fields(type(stage)):
            value, kind, base = getattr(stage, f.name), f.metadata["spp"].path, base_for(index, f.name)
            if value is None:
                continue
            if kind == "source":
                value = _local_path(value, base) or value
            elif kind == "dir":
                value = _dir_path(value, base)
            elif kind == "task":  # a list of tasks, or one (finetune's eval_ppl_source)
                tasks = [f"ppl:{_local_path(t[4:], base) or t[4:]}" if t.startswith("ppl:") else t
                         for t in ([value] if isinstance(value, str) else value)]
                value = tasks[0] if isinstance(value, str) else tasks
            elif kind == "model" and isinstance(value, list):
                value = [_resolve_reference(v, index, recipe.stages, base, fail, f.name) for v in value]
                repeated = sorted({v for v in value if value.count(v) > 1})
                if repeated:
                    fail(f"{repeated[0]!r} is listed twice; list each model once", f.name)
            elif kind == "model":
                value = _resolve_reference(value, index, recipe.stages, base, fail, f.name)
            setattr(stage, f.name, value)
        stage.input = stage.input or previous_model
        if isinstance(stage, EvalStage):
            stage.models = stage.models or [stage.input]
        else:
            previous_model = stage.name
        _inherit(stage, recipe)


def _inherit(stage: Stage, top: Recipe) -> None:
    """Null keys marked `inherit` take the top level's value (a recipe's, or the defaults for a command)."""
    for f in schema_fields(type(stage)):
        inherit = f.metadata["spp"].inherit
        if inherit and getattr(stage, f.name) is None:
            setattr(stage, f.name, getattr(top, inherit))


def validate_options(cls: type[Stage], values: dict[str, Any], *, flags: bool = False) -> Stage:
    """A stage's options given as keywords (a command's options, the Python API), with the recipe's checks.

    Errors name the key as `--key-name` when `flags`, else as the recipe key. Inherited nulls take the top-level
    defaults (seed 0, device auto, dtype auto).
    """

    def label(key: str) -> str:
        return "--" + key.replace("_", "-") if flags else key

    def fail(message: str, key: str | None = None, show_key: bool = True) -> NoReturn:
        raise BadInput(f"{label(key)}: {message}" if key and show_key else message)

    allowed = [f.name for f in schema_fields(cls) if f.name not in COMMAND_KEYS]
    for key in values:
        if key not in allowed:
            hint = did_you_mean(label(key), [label(name) for name in allowed])
            raise BadInput(f"unknown {cls.TYPE} option {label(key)!r}{hint}")
    stage = cls(**_read_fields(cls, values, fail, skip=COMMAND_KEYS))
    stage.name = cls.TYPE
    _inherit(stage, Recipe(model="", stages=[]))
    stage.check(fail)
    return stage


def _apply_overrides(data: dict, overrides: Sequence[str]) -> dict[tuple[int | None, str], str]:
    """Set each `key.path=value` in `data` (in place); returns where each overridden key came from."""
    origins: dict[tuple[int | None, str], str] = {}
    for text in overrides:
        key_path, equals, raw_value = text.partition("=")
        parts = key_path.strip().split(".")
        if not equals or not all(parts):
            raise BadInput(f"override {text!r} is not KEY=VALUE; use e.g. stages.prune.sparsity=0.6 or seed=1")
        value = parse_yaml(raw_value, f"override {text}")
        if len(parts) == 1:
            data[parts[0]] = value
            origins[(None, parts[0])] = text
        elif len(parts) == 3 and parts[0] == "stages":
            index = _find_stage(data.get("stages"), parts[1], text)
            data["stages"][index][parts[2]] = value
            origins[(index, parts[2])] = text
        else:
            raise BadInput(f"override {text!r}: use stages.<stage name>.<key>=value or <top-level key>=value")
    return origins


def _find_stage(stages: Any, name: str, text: str) -> int:
    """The index of the stage `name` (its name, else its type; or a number) in raw recipe data."""
    stages = stages if isinstance(stages, list) else []
    names = [str(s.get("name") or s.get("type")) if isinstance(s, dict) else "" for s in stages]
    if name in names:
        return names.index(name)
    if name.isdigit() and int(name) < len(stages) and isinstance(stages[int(name)], dict):
        return int(name)
    raise BadInput(
        f"override {text}: no stage named {name!r}{did_you_mean(name, names)} (stages: {', '.join(names) or 'none'})"
    )


# ---------------------------------------------------------------------------------------------- provenance


def dump_resolved(recipe: Recipe, stage: Stage) -> str:
    """The resolved recipe as YAML, to save in `stage`'s folder; `spp run` on it reproduces the run."""
    header = f"# spp: the resolved recipe, saved by stage {stage.name!r} ({stage.TYPE}); defaults filled in\n"
    return header + yaml.safe_dump(recipe.to_yaml_dict(), sort_keys=False, allow_unicode=True, width=120)

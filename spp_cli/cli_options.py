"""Typer options derived from the recipe schema, so a command, a recipe and the Python API share one definition
of every option: its name (dashes for underscores), type, default, choices and help (spp_cli/recipe/schema.py).

Torch-free: `spp --help` builds every command from these tables without importing an engine.
"""

import dataclasses
import inspect
from collections.abc import Callable
from enum import Enum, StrEnum
from typing import Annotated, Any

import typer

from spp_cli.recipe.schema import COMMAND_KEYS, Option, Recipe, schema_fields

PYTHON_TYPES = {"int": int, "float": float, "bool": bool}
TOP_LEVEL_DEFAULTS = Recipe(model="", stages=[])  # what an inherited key means outside a recipe


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def command_default(field: dataclasses.Field) -> Any:
    """A key's default as a command sees it: an inherited key takes the top-level default (seed 0, auto)."""
    option: Option = field.metadata["spp"]
    if option.inherit:
        return getattr(TOP_LEVEL_DEFAULTS, option.inherit)
    return None if option.required else field.default


def _choices_type(field: dataclasses.Field) -> type[Enum]:
    """An Enum of the key's choices: Typer shows them as <a|b|c> and refuses anything else."""
    choices = field.metadata["spp"].choices
    return StrEnum(f"{field.name}_choices", {choice: choice for choice in choices})


def schema_choices(stage_class: type, key: str) -> type[Enum]:
    """The Enum of a schema key's choices, for a command option that shares the key's vocabulary but not its stage
    (`spp merge --streaming` takes prune's auto/on/off: the schema has no merge stage)."""
    return _choices_type(next(f for f in schema_fields(stage_class) if f.name == key))


def schema_parameter(field: dataclasses.Field, *, argument: bool = False) -> inspect.Parameter:
    """The Typer parameter of one schema key (an option, or with `argument` a positional list)."""
    option: Option = field.metadata["spp"]
    default = command_default(field)
    python_type: Any = _choices_type(field) if option.choices else PYTHON_TYPES.get(option.kind, str)
    if argument:
        info = typer.Argument(help=option.help, show_default=False, metavar="MODEL...")
        return inspect.Parameter(field.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
            list[str], info])
    if option.choices and default is not None:
        default = python_type(default)
    # an inherited key shows its value here (seed 0, auto), not the recipe's wording ("recipe's seed")
    show_default: bool | str = (not option.inherit and option.default_text) or default is not None
    if option.kind == "bool":
        show_default = False  # a flag: present means true
    info = typer.Option(flag_name(field.name), help=option.help, show_default=show_default, metavar=_metavar(option))
    annotation = python_type if default is not None or option.required else python_type | None
    return inspect.Parameter(
        field.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=... if option.required else default,
        annotation=Annotated[annotation, info],
    )


def _metavar(option: Option) -> str | None:
    if option.kind == "bool":
        return ""  # a flag takes no value: no `<bool>` after it
    if option.choices:
        return None  # Typer shows the choices
    return {"int": "INT", "float": "NUMBER", "list": "A,B,...", "regex": "REGEX", "pattern": "PATTERN",
            "max_memory": "DEVICE=SIZE,..."}.get(
        option.kind, "TEXT"
    )


def command_fields(stage_class: type, positional: str | None = None) -> list[dataclasses.Field]:
    """The schema keys a stage's command offers as options (not the recipe-only ones, not the positional)."""
    return [f for f in schema_fields(stage_class) if f.name not in (*COMMAND_KEYS, positional)]


def plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def schema_command(
    stage_class: type,
    *,
    leading: list[inspect.Parameter],
    trailing: list[inspect.Parameter],
    positional: str | None = None,
) -> Callable[[Callable], Callable]:
    """Decorate `body(options, **rest)` into a Typer command whose options are the stage's schema keys.

    `options` is a dict of every schema key's value (plain strings for choices); `rest` holds the leading and
    trailing parameters (model, --out, --format, ...), which are the command's own.
    """
    fields = command_fields(stage_class, positional)
    keys = [f.name for f in fields] + ([positional] if positional else [])
    schema = [schema_parameter(f) for f in fields]
    if positional:
        (field,) = [f for f in schema_fields(stage_class) if f.name == positional]
        leading = [schema_parameter(field, argument=True), *leading]

    def decorate(body: Callable) -> Callable:
        def command(**values: Any) -> Any:
            options = {key: plain(values.pop(key)) for key in keys}
            return body(options, **values)

        command.__signature__ = inspect.Signature([*leading, *schema, *trailing])
        command.__name__, command.__doc__ = body.__name__, body.__doc__
        return command

    return decorate


def parameter(name: str, annotation: Any, info: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    """A command's own parameter (not a schema key): a positional model, --out, --format, ..."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if isinstance(info, typer.models.ArgumentInfo) else (
        inspect.Parameter.KEYWORD_ONLY)
    return inspect.Parameter(name, kind, default=default, annotation=Annotated[annotation, info])

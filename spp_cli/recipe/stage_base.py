"""The base of every stage's schema: the keys all stages have, the one rule of what a result records, and the
option fields several stages share (device, dtype, a per-method default in words). Pure Python (no torch).

The stage tables themselves are spp_cli/recipe/schema.py (prune, eval, the recipe) and
spp_cli/recipe/finetune_schema.py (finetune).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

from spp_cli.adapters import REGISTRY
from spp_cli.recipe.option import option_field, schema_fields
from spp_cli.vocabulary import DTYPES

Fail = Callable[..., NoReturn]  # fail(message, key) raises BadInput naming the key path
COMMAND_KEYS = ("name", "input")  # recipe-only: a command names its model and output itself
_MODEL_REF = "dense (the recipe's model), an earlier prune/finetune stage's name, a local model folder or a hub id"


def device_option_field() -> Any:
    return option_field(None, "device", inherit="device", default_text="recipe's device", help="Compute device.")


def dtype_option_field() -> Any:
    return option_field(
        None, choices=DTYPES, inherit="dtype", default_text="recipe's dtype",
        help="Compute dtype; auto is the checkpoint's (on a CPU: fp32 to fine-tune, and to prune fp16).",
    )


def method_defaults(key: str) -> str:
    """The default of a per-method option in words, e.g. "spp 16" or "spp 4e-3, lora 3e-4, ..."."""
    pairs = [(m.name, m.default_lr if key == "lr" else m.options[key]) for m in REGISTRY.values()
             if key == "lr" or key in m.options]
    return ", ".join(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}" for name, value in pairs)


@dataclass
class Stage:
    """Keys every stage has. After loading, `input` is "dense", an earlier stage's name, or a path / hub id."""

    TYPE: ClassVar[str] = ""
    # What decides a stage's result is recorded (spp.json's or results.json's "config") and fingerprinted, by one
    # rule for every stage (`recorded_options`): every key but the command keys (name, input: the parent counts by
    # its manifest) and NOT_RECORDED (what does not change the result); each key of RECORDED_WHEN_SET, with the keys
    # that only mean something then, only when it is not its default (so the fingerprints of runs made before that
    # key existed stay what they were).
    NOT_RECORDED: ClassVar[tuple[str, ...]] = ()
    RECORDED_WHEN_SET: ClassVar[dict[str, tuple[str, ...]]] = {}
    name: str = option_field(
        "", text="a name of letters, digits, _ and - (the folder <output_dir>/<name>)", default_text="its type"
    )
    input: str | None = option_field(
        None, path="model", text=_MODEL_REF, default_text="previous model stage, else dense"
    )

    def options(self) -> dict[str, Any]:
        """The resolved options, in schema order: what the manifest's `config` and the fingerprint record."""
        values = dataclasses.asdict(self)
        return {"name": values.pop("name"), "type": self.TYPE, **values}

    def command_options(self) -> dict[str, Any]:
        """Every key a stage function takes as a keyword (all but the recipe's name and input)."""
        return {f.name: getattr(self, f.name) for f in schema_fields(type(self)) if f.name not in COMMAND_KEYS}

    def recorded_options(self) -> dict[str, Any]:
        """The options that decide the result, in schema order, by the rule above NOT_RECORDED."""
        optional = {key for key, companions in self.RECORDED_WHEN_SET.items() for key in (key, *companions)}
        recorded = {f.name: getattr(self, f.name) for f in schema_fields(type(self))
                    if f.name not in (*COMMAND_KEYS, *self.NOT_RECORDED) and f.name not in optional}
        defaults = {f.name: f.default for f in schema_fields(type(self))}
        for key, companions in self.RECORDED_WHEN_SET.items():
            if getattr(self, key) != defaults[key]:
                recorded |= {name: getattr(self, name) for name in (key, *companions)}
        return recorded

    def reads(self) -> list[str]:
        """The models this stage reads: "dense", stage names, paths or hub ids."""
        return [self.input] if self.input is not None else []

    def check(self, fail: Fail) -> None:
        """Checks across keys (may fill a default that depends on another key); `fail(message, key)` raises."""

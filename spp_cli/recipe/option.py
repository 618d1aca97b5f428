"""One recipe key's rules (`Option`), kept in its dataclass field's metadata, so the schema's tables are the code.
Pure Python (no torch)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from spp_cli.vocabulary import DEVICE_TEXT


@dataclass(frozen=True)
class Option:
    """What one recipe key accepts. Lives in the dataclass field's metadata, so the table is the code."""

    kind: str  # str | int | float | bool | list | regex | pattern | device | stages | expect | max_memory
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is excluded
    high_open: bool = False
    required: bool = False
    nullable: bool = False
    path: str = ""  # how to resolve: "source" (SOURCE or model), "dir" (always a path), "model" (a model ref), "task"
    text: str = ""  # what is allowed, in words, when the kind alone does not say it
    default_text: str = ""  # the default, in words, when it is computed
    help: str = ""  # one sentence for `--help` and the README's recipe reference
    inherit: str = ""  # null means the recipe's top-level key of this name (a command's default is that key's)

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.text:
            return self.text
        if self.kind in ("int", "float"):
            noun = "an integer" if self.kind == "int" else "a number"
            if self.low is not None and self.high is not None:
                left, right = "(["[not self.low_open], ")]"[not self.high_open]
                return f"{noun} in {left}{self.low:g}, {self.high:g}{right}"
            if self.low is not None:
                return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
            return noun
        return {
            "bool": "true or false",
            "list": "a list of strings (or one comma-separated string)",
            "regex": "a Python regular expression",
            "pattern": "unstructured or N:M with 0 < N < M (e.g. 2:4)",
            "device": DEVICE_TEXT,
        }.get(self.kind, "a string")

    def in_range(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))


def option_field(default: Any = None, kind: str = "str", *, required: bool = False, **option: Any) -> Any:
    """A dataclass field that is a recipe key; `default=None` (and not required) means null is allowed."""
    spec = Option(kind, required=required, nullable=default is None and not required, **option)
    return field(default=default, metadata={"spp": spec})


def schema_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "spp" in f.metadata]

"""The YAML loader recipes are read with: YAML 1.2 scalars and no duplicate keys (spp_cli/recipe/resolve.py uses it)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from spp_cli.errors import BadInput

__all__ = ["RecipeLoader", "parse_yaml"]


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars, because YAML 1.1's surprise people:

    - no sexagesimal numbers: a bare `2:4` is the string "2:4", not the integer 124;
    - `4e-3` and `1e5` are floats (YAML 1.1 wants a dot: `4.0e-3`), not strings;
    - only true/false are booleans: yes/no/on/off stay strings (bool keys accept them);
    - 010 is the integer 10, not octal 8;
    - a key written twice in one mapping is an error, not "the last one wins".
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        self.flatten_mapping(node)
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys are left to SafeLoader's own error
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_REPLACED_TAGS = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
RecipeLoader.add_implicit_resolver(  # decimal (010 is ten, not YAML 1.1's octal eight), 0x.., 0o.., 0b..; no 2:4
    "tag:yaml.org,2002:int",
    re.compile(r"^[-+]?(?:0b[01_]+|0o[0-7_]+|0x[0-9a-fA-F_]+|[0-9][0-9_]*)$"),
    list("-+0123456789"),
)
RecipeLoader.add_implicit_resolver(  # a dot or an exponent makes a float: 0.5, .5, 4e-3, 1E5, .inf, .nan
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_int(loader: RecipeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    return int(text, 0) if text.lstrip("+-")[:2].lower() in ("0b", "0o", "0x") else int(text)


RecipeLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python objects with RecipeLoader; a syntax error is BadInput naming `source` and the line."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # RecipeLoader is a SafeLoader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f"{source} line {mark.line + 1}" if mark is not None else source
        problem = getattr(error, "problem", None) or getattr(error, "context", None) or "invalid syntax"
        problem = " ".join(str(problem).split())
        fix = "write each key once" if "duplicate key" in problem else "check the indentation and quoting"
        raise BadInput(f"{where}: could not parse YAML ({problem}); {fix}") from None

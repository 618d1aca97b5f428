"""The README's recipe reference: one row per key of every stage, read from the schema."""

import yaml

from spp_cli.recipe.option import Option, schema_fields
from spp_cli.recipe.schema import STAGE_TYPES, Recipe


def describe_schema() -> list[tuple[str, str, str, str, str]]:
    """Rows (stage type or "recipe", key, type, default, allowed) for the README's recipe reference."""
    rows = []
    for section, cls in [("recipe", Recipe), *STAGE_TYPES.items()]:
        for f in schema_fields(cls):
            option: Option = f.metadata["spp"]
            if option.required:
                default = "required"
            elif option.default_text:
                default = option.default_text
            else:
                default = yaml.safe_dump(f.default, default_flow_style=True).removesuffix("\n...\n").strip()
            rows.append((section, f.name, str(f.type), default, option.allowed()))
            if f.name == "name" and section != "recipe":
                rows.append((section, "type", "str", "required", section))
    return rows

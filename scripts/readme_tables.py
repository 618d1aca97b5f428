"""Regenerate README's recipe reference (every key, its type, default and allowed values) from the schema.

    .venv/bin/python scripts/readme_tables.py      # rewrites the table in README.md in place

tests/test_recipe.py checks that README holds exactly these rows.
"""

from pathlib import Path

from spp_cli.recipe.reference import describe_schema

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| section | key | type | default | allowed |\n|---|---|---|---|---|\n"


def main() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index(HEADER) + len(HEADER)
    end = text.index("\n\n", start)
    rows = "\n".join(f"| {section} | `{key}` | {kind} | {default} | {allowed} |"
                     for section, key, kind, default, allowed in describe_schema())
    README.write_text(text[:start] + rows + text[end:], encoding="utf-8")


if __name__ == "__main__":
    main()

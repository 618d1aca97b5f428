"""README's quickstart table is recipes/quickstart.yaml's pinned results (its `expect:`), which `spp run` checks:
the numbers a newcomer reads are the numbers a run is held to (scripts/readme_tables.py writes the table)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "scripts" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _readme_quickstart_rows() -> tuple[list[str], list[list[str]]]:
    """(header cells, row cells) of the first README table whose header starts `| model | sparsity ...`."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model | sparsity of pruned linears |"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table[0], table[2:]


def test_readme_quickstart_numbers_are_the_pinned_expectations():
    from spp_cli.recipe.resolve import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    header, rows = _readme_quickstart_rows()
    assert header[2] == "python-docs:test token ppl @256"
    task = "ppl:builtin:python-docs:test"
    shown = {}
    for name_cell, sparsity_cell, ppl_cell in rows:
        name = name_cell.split()[0]  # "prune (Wanda 70%)" -> prune
        shown[(name, task)] = float(ppl_cell.split()[0])  # "123.58 (+84% over dense)" -> 123.58
        if name != "dense":
            shown[(name, "sparsity")] = float(sparsity_cell.split()[0])
    pinned = {(name, metric): pin for name, metrics in recipe.expect.items() for metric, pin in metrics.items()}
    assert sorted(shown) == sorted(pinned)  # every pin is in the table, and nothing else
    for key, value in shown.items():
        pin = pinned[key]
        assert abs(value - pin["value"]) <= pin["rel_tol"] * abs(pin["value"]), (key, value, pin)


def test_readme_quickstart_table_is_the_generated_one():
    """A changed pin without `python scripts/readme_tables.py` fails here (the derived % columns too)."""
    from spp_cli.recipe.resolve import load_recipe

    tables = _readme_tables()
    table = tables.quickstart_table(load_recipe(tables.QUICKSTART))
    assert table in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "| prune (Wanda 70%) | 0.6961 | 123.58 (+84% over dense) |" in table

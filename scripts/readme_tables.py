"""Regenerate README's generated tables in place:

- the recipe reference (every key, its type, default and allowed values) from the schema;
- the quickstart results from recipes/quickstart.yaml's pinned `expect:` values (what `spp run` checks).

    .venv/bin/python scripts/readme_tables.py      # rewrites both tables in README.md

tests/test_recipe.py checks that README holds exactly the reference's rows, tests/test_readme_quickstart.py that
its quickstart table is this one and that its numbers are the recipe's pins.
"""

from pathlib import Path

from spp_cli.recipe.reference import describe_schema
from spp_cli.recipe.resolve import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
HEADER = "| section | key | type | default | allowed |\n|---|---|---|---|---|\n"
QUICKSTART_START = "| model | sparsity of pruned linears |"  # the quickstart table's header begins so
METHOD_NAMES = {"wanda": "Wanda", "sparsegpt": "SparseGPT", "spp": "SPP", "lora": "LoRA"}


def reference_rows() -> str:
    return "\n".join(f"| {section} | `{key}` | {kind} | {default} | {allowed} |"
                     for section, key, kind, default, allowed in describe_schema())


def quickstart_table(recipe: Recipe) -> str:
    """The table of the recipe's last eval stage: one row per model, its pinned sparsity and first task's value."""
    from spp_cli.render import short_task_name

    evaluation = [stage for stage in recipe.stages if stage.TYPE == "eval"][-1]
    task = evaluation.tasks[0]
    pins = recipe.expect

    def ppl(name: str) -> float:
        return pins[name][task]["value"]

    lines = [f"{QUICKSTART_START} {short_task_name(task)} token ppl @{evaluation.seqlen} |", "|---|---|---|"]
    for name in evaluation.models:
        if name == "dense":
            lines.append(f"| dense | 0 (dense) | {ppl(name):.2f} |")
            continue
        stage = recipe.stage(name)
        method = METHOD_NAMES.get(stage.method, stage.method)
        sparsity = f"{pins[name]['sparsity']['value']:.4f}"
        if stage.TYPE == "prune":
            label = f"{name} ({method} {stage.sparsity:.0%})"
            cells = [sparsity, f"{ppl(name):.2f} ({ppl(name) / ppl('dense') - 1:+.0%} over dense)"]
        else:
            label, parent = f"{name} ({method}, merged)", ppl(stage.input)
            recovered = (parent - ppl(name)) / (parent - ppl("dense"))
            cells = [f"{sparsity} (same zeros, verified)", f"{ppl(name):.2f} ({recovered:.0%} of the gap won back)"]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def replace_block(text: str, start: int, block: str) -> str:
    """`text` with the lines from `start` to the next blank line replaced by `block`."""
    end = text.index("\n\n", start)
    return text[:start] + block + text[end:]


def main() -> None:
    text = README.read_text(encoding="utf-8")
    text = replace_block(text, text.index(HEADER) + len(HEADER), reference_rows())
    text = replace_block(text, text.index(QUICKSTART_START), quickstart_table(load_recipe(QUICKSTART)))
    README.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()

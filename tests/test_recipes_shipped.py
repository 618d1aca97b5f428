"""Every shipped recipe validates with `spp run --dry-run` (no model is loaded)."""

import json

import pytest
from conftest import REPO, run_spp

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
RECIPES = [path for path in RECIPES if "launch" not in path.parts]


def test_the_paper_grid_is_complete():
    names = {path.stem for path in RECIPES}
    for model in ("llama-7b", "llama2-7b"):
        for setting in ("50", "60", "70", "75", "2of4", "4of8"):
            assert f"{model}-{setting}" in names


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_validates(recipe, capsys):
    code, out, err = run_spp(["run", recipe, "--dry-run", "--format", "json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["dry_run"] and summary["stages"]
    types = [stage["type"] for stage in summary["stages"]]
    assert types[0] == "prune" and "finetune" in types and types[-1] == "eval"

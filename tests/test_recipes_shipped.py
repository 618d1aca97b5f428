"""Every shipped recipe is valid; the offline ones pass the whole `spp run --dry-run` (no model is loaded), and
the paper recipes, which need the Hub, are refused offline by the dry run with one line saying so."""

import json

import pytest
from conftest import REPO, run_spp

from spp_cli.recipe.resolve import load_recipe

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
RECIPES = [path for path in RECIPES if "launch" not in path.parts]
PAPER = [path for path in RECIPES if "paper" in path.parts]
# gpu-check's model is made by scripts/gpu_check.sh, which runs the recipe for real (tests/test_gpu_check.py)
OFFLINE = [path for path in RECIPES if "paper" not in path.parts and path.stem != "gpu-check"]
# the study's zero-shot tasks read the public data (its command line names the folder: stages.eval.data_dir=...)
WITH_DATA = [path for path in OFFLINE if path.stem == "recovery-study"]
OFFLINE = [path for path in OFFLINE if path not in WITH_DATA]


def test_the_paper_grid_is_complete():
    names = {path.stem for path in PAPER}
    for model in ("llama-7b", "llama2-7b"):
        for setting in ("50", "60", "70", "75", "2of4", "4of8"):
            assert f"{model}-{setting}" in names


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_is_valid(recipe):
    stages = load_recipe(recipe).stages
    types = [stage.TYPE for stage in stages]
    assert types[0] == "prune" and "finetune" in types and types[-1] == "eval"


@pytest.mark.parametrize("recipe", OFFLINE, ids=[path.stem for path in OFFLINE])
def test_offline_recipe_passes_the_dry_run(recipe, capsys):
    code, out, err = run_spp(["run", recipe, "--dry-run", "--format", "json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["dry_run"] and summary["stages"]


@pytest.mark.parametrize("recipe", WITH_DATA, ids=[path.stem for path in WITH_DATA])
def test_recipe_with_the_public_data_passes_the_dry_run(recipe, test_data, capsys):
    code, out, err = run_spp(["run", recipe, "--dry-run", "--format", "json", f"stages.eval.data_dir={test_data}"],
                             capsys)
    assert code == 0, err
    assert len(json.loads(out)["stages"]) == 23  # every row of the study, and its eval


@pytest.mark.parametrize("recipe", PAPER[:2], ids=[path.stem for path in PAPER[:2]])
def test_paper_recipe_dry_run_says_it_needs_the_hub(recipe, capsys):
    code, _, err = run_spp(["run", recipe, "--dry-run"], capsys)
    assert code == 2 and err.count("\n") == 1 and "offline" in err, err

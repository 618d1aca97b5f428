"""A finetune stage's `sweep:` (spp_cli/recipe/sweep.py): its expansion into named stages, the eval stage's models, and
every bad sweep as one line naming the stage and the fix."""

import copy

import pytest

from spp_cli.errors import BadInput
from spp_cli.recipe.resolve import parse_recipe
from spp_cli.report_sweep import mean_and_spread, pick

RECIPE = {"model": "builtin:tiny-llama", "stages": [
    {"name": "prune", "type": "prune", "method": "magnitude"},
    {"name": "spp", "type": "finetune", "data": "builtin:python-docs:train",
     "sweep": {"lr": [1.3e-3, 4e-3, 1.2e-2], "seed": [0, 1]}},
    {"name": "eval", "type": "eval", "models": ["prune", "spp"], "tasks": ["wikitext2"]}]}


def test_a_sweep_becomes_one_stage_per_combination_and_the_eval_reads_them_all():
    recipe = parse_recipe(copy.deepcopy(RECIPE))
    members = [f"spp-lr{lr}-seed{seed}" for lr in ("13e-4", "4e-3", "12e-3") for seed in (0, 1)]
    assert recipe.stage_names == ["prune", *members, "eval"]
    assert recipe.stage("eval").models == ["prune", *members]
    member = recipe.stage("spp-lr12e-3-seed1")
    assert (member.lr, member.seed, member.input, member.method) == (1.2e-2, 1, "prune", "spp")
    assert recipe.sweeps["spp"][0] == {"stage": "spp-lr13e-4-seed0", "values": {"lr": 1.3e-3, "seed": 0}}
    assert "sweep" not in recipe.to_yaml_dict()["stages"][1]  # the resolved recipe lists the stages themselves


@pytest.mark.parametrize(("change", "message"), [
    ({"sweep": [1, 2]}, "stages[1] (spp).sweep: [1, 2] is not allowed; use a mapping of option: [values]"),
    ({"sweep": {"lrr": [1]}}, "sweep: unknown key 'lrr'; did you mean 'lr'?"),
    ({"sweep": {"lr": [1, 1.0]}}, "sweep: lr: [1, 1.0] lists a value twice"),
    ({"sweep": {"lr": [-1]}}, "sweep: lr: -1 is out of range"),
    ({"sweep": {"lr": [1e-3, 2e-3]}, "val_size": 0}, "picks lr on the held-out loss, which val_size 0 leaves empty"),
    ({"sweep": {"lr": [1e-3]}, "lr": 1e-3}, "sweep: lr is set on the stage and swept: drop one of them"),
    ({"sweep": {"groups": [3]}, "method": "lora"}, "sweep: at groups 3: groups: applies to method spp, not lora"),
    ({"sweep": {"lr": [1.0001e-3, 1.0002e-3]}}, "makes a stage named 'spp-lr1e-3' twice"),
])
def test_a_bad_sweep_is_one_line_naming_the_stage(change, message):
    data = copy.deepcopy(RECIPE)
    data["stages"][1].update(change)
    with pytest.raises(BadInput) as error:
        parse_recipe(data)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_stage_cannot_read_a_whole_sweep_and_only_finetune_stages_sweep():
    data = copy.deepcopy(RECIPE)
    data["stages"].insert(2, {"name": "again", "type": "finetune", "data": "builtin:python-docs:train"})
    with pytest.raises(BadInput, match=r"stages\[2\] \(again\).input: reads 'spp', a sweep of 6 stages"):
        parse_recipe(data)
    data = copy.deepcopy(RECIPE)
    data["stages"][0]["sweep"] = {"sparsity": [0.5]}
    with pytest.raises(BadInput, match=r"stages\[0\] \(prune\).sweep: applies to finetune stages only"):
        parse_recipe(data)


def test_the_pick_is_the_lowest_mean_held_out_loss_and_the_figures_are_mean_and_half_range():
    members = [{"stage": f"s{lr}-{seed}", "values": {"lr": lr, "seed": seed}} for lr in (1, 2) for seed in (0, 1)]
    losses = {"s1-0": 2.0, "s1-1": 2.6, "s2-0": 2.2, "s2-1": 2.3}  # means 2.3 and 2.25: lr 2 wins
    manifests = {name: {"training": {"eval_loss": loss}} for name, loss in losses.items()}
    evaluations = {name: {"perplexity": {"wikitext2": {"value": 10.0 + index, "seqlen": 64}},
                          "results": {"boolq": {"acc,none": 0.5 + index / 10}}}
                   for index, name in enumerate(losses)}
    chosen = pick(members, manifests, evaluations)
    assert chosen["chosen"]["values"] == {"lr": 2} and chosen["chosen"]["stages"] == ["s2-0", "s2-1"]
    assert chosen["chosen"]["mean_held_out_loss"] == pytest.approx(2.25)
    assert chosen["test"]["wikitext2 token ppl @64"] == {"mean": 12.5, "spread": 0.5, "values": [12.0, 13.0]}
    assert chosen["test"]["boolq acc"]["mean"] == pytest.approx(0.75)
    assert chosen["test"]["boolq acc"]["spread"] == pytest.approx(0.05)
    assert mean_and_spread([1.0, 4.0, 2.0]) == (7 / 3, 1.5)

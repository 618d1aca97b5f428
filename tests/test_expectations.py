"""A recipe's pinned results (`expect:`, spp_cli/expectations.py): checked after `spp run`'s last stage, a miss
named and exit 1, a pin on something the recipe does not measure refused before any stage runs (exit 2)."""

import json

import pytest
import yaml
from conftest import run_spp

from spp_cli.errors import BadInput
from spp_cli.expectations import check_expectations, describe
from spp_cli.recipe.resolve import dump_resolved, load_recipe

RECIPE = """
model: {model}
output_dir: run
stages:
  - name: prune
    type: prune
    method: magnitude
    sparsity: 0.5
  - name: eval
    type: eval
    models: [dense, prune]
    tasks: [ppl:{text}]
    seqlen: 32
    limit: 2
"""


@pytest.fixture
def tiny_run(tmp_path, random_model_dir, capsys):
    """(a recipe writer, the measured numbers) after one run of a magnitude prune and a 2-window ppl eval."""
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"line {i}: the quick brown fox jumps over the lazy dog " * 4}) + "\n"
                            for i in range(8)))

    def write(expect: dict | None = None):
        path = tmp_path / "recipe.yaml"
        body = RECIPE.format(model=random_model_dir, text=text)
        path.write_text(body + (yaml.safe_dump({"expect": expect}) if expect is not None else ""))
        return path

    code, out, err = run_spp(["run", write(), "--format", "json"], capsys)
    assert code == 0, err
    assert "expectations" not in json.loads(out)
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["models"]
    measured = {name: results[name]["perplexity"][f"ppl:{text}"]["value"] for name in ("dense", "prune")}
    return write, measured, f"ppl:{text}"


def test_right_pins_pass_and_a_wrong_one_is_named_with_exit_1(tiny_run, capsys):
    write, measured, task = tiny_run
    pins = {"dense": {task: {"value": measured["dense"], "rel_tol": 1e-6}},
            "prune": {task: {"value": round(measured["prune"], 4), "rel_tol": 1e-4},
                      "sparsity": {"value": 0.5, "rel_tol": 1e-3}}}  # measured: 0.500171
    code, out, err = run_spp(["run", write(pins)], capsys)
    assert code == 0, out
    assert out.splitlines()[-1] == "expectations: 3/3 within tolerance"
    # the pins are not in any stage's fingerprint: adding them reran nothing
    code, out, _ = run_spp(["run", write(pins), "--format", "json"], capsys)
    summary = json.loads(out)
    assert code == 0 and all(stage["skipped"] for stage in summary["stages"])
    assert summary["expectations"]["ok"] and summary["expectations"]["within"] == 3

    wrong = 1.05 * measured["prune"]  # 5% off, beyond a 2% tolerance
    pins["prune"][task] = {"value": wrong, "rel_tol": 0.02}
    code, out, _ = run_spp(["run", write(pins)], capsys)
    lines = out.splitlines()
    assert code == 1
    assert lines[-1] == "expectations: 2/3 within tolerance"
    assert lines[-2] == (f"expectation missed: prune {task} {measured['prune']:.6g}, pinned {wrong:.6g} ± 2% "
                         f"({100 * (measured['prune'] - wrong) / wrong:+.3g}%)")
    code, out, _ = run_spp(["run", write(pins), "--format", "json"], capsys)
    missed = [r for r in json.loads(out)["expectations"]["results"] if not r["ok"]]
    assert code == 1 and [(r["name"], r["metric"]) for r in missed] == [("prune", task)]


@pytest.mark.parametrize(("expect", "message"), [
    ({"finetune": {"sparsity": {"value": 0.5, "rel_tol": 0}}},
     "recipe key expect.finetune: no stage writes or evaluates 'finetune' (known: prune, dense)"),
    ({"dense": {"ppl:builtin:python-docs:test": {"value": 1, "rel_tol": 0}}},
     "recipe key expect.dense.ppl:builtin:python-docs:test: no eval stage measures it for 'dense'"),
    ({"prune": {"boolq/acc": {"value": 0.6, "rel_tol": 0.1}}},
     "recipe key expect.prune.boolq/acc: no eval stage measures it for 'prune'"),
])
def test_a_pin_nothing_measures_is_refused_before_any_stage(expect, message, tiny_run, tmp_path, capsys):
    write, _, _ = tiny_run
    code, _, err = run_spp(["run", write(expect), "--dry-run"], capsys)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize(("expect", "message"), [
    ([1, 2], "expect: is not a mapping: model or stage name -> metric"),
    ({"prune": {"sparsity": 0.5}}, "expect: prune.sparsity: 0.5 must be {value: number, rel_tol: number >= 0}"),
    ({"prune": {"sparsity": {"value": 0.5}}}, "both keys and no other"),
    ({"prune": {"sparsity": {"value": "half", "rel_tol": 0}}}, "expect: prune.sparsity.value: 'half' is not a"),
    ({"prune": {"sparsity": {"value": 0.5, "rel_tol": -1}}}, "prune.sparsity.rel_tol: -1 is negative"),
    ({"prune": []}, "'prune' must map metric names to {value, rel_tol}"),
])
def test_malformed_pins_are_one_line_naming_the_key(expect, message, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(model="builtin:tiny-llama", text="x.txt") + yaml.safe_dump({"expect": expect}))
    with pytest.raises(BadInput, match="^" + str(path)) as error:
        load_recipe(path)
    assert message in str(error.value)


def test_pins_round_trip_and_a_recipe_without_them_dumps_as_before(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(model="builtin:tiny-llama", text="x.txt"))
    recipe = load_recipe(path)
    assert recipe.expect is None and "expect" not in dump_resolved(recipe, recipe.stages[0])
    path.write_text(path.read_text() + "expect:\n  prune:\n    sparsity: {value: 1, rel_tol: 0}\n")
    recipe = load_recipe(path)
    assert recipe.expect == {"prune": {"sparsity": {"value": 1.0, "rel_tol": 0.0}}}
    again = tmp_path / "again.yaml"
    again.write_text(dump_resolved(recipe, recipe.stages[0]))
    assert load_recipe(again) == recipe


def test_check_reads_sparsity_from_spp_json_and_names_what_was_not_measured():
    expect = {"prune": {"sparsity": {"value": 0.6961, "rel_tol": 1e-4}, "boolq": {"value": 0.6, "rel_tol": 0.1},
                        "boolq/acc_norm": {"value": 0.7, "rel_tol": 0.01}, "mean_acc_7": {"value": 0.5, "rel_tol": 0}}}
    manifests = {"prune": {"overall_sparsity": 0.696119}}
    evaluations = {"prune": {"results": {"boolq": {"acc,none": 0.62, "acc_norm,none": 0.7}},
                             "model": {"sparsity": 0.1}}}
    checked = check_expectations(expect, manifests, evaluations)
    assert [r["ok"] for r in checked["results"]] == [True, True, True, False]
    assert checked["results"][0]["observed"] == 0.696119  # spp.json's, not the eval's record
    assert describe(checked["results"][3]) == "prune mean_acc_7: not measured by this run, pinned 0.5 ± 0%"


def test_the_quickstart_pins_what_it_measures():
    from pathlib import Path

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
    from spp_cli.expectations import check_measured

    check_measured(recipe.expect, recipe)
    assert sorted(recipe.expect) == ["dense", "finetune", "prune"]
    assert all(pin["rel_tol"] > 0 for metrics in recipe.expect.values() for pin in metrics.values())

"""Checks that come before the work: `spp run --dry-run` and every stage refuse, with one line and exit 2, what
would fail later (missing data, offline sources, groups that do not divide a layer, a missing logger, an output
that cannot be written) — and load no model."""

import pytest
from conftest import SOME_DATA, run_spp

QUICK = """model: builtin:tiny-llama
output_dir: {out}
stages:
  - {{type: prune, method: wanda, sparsity: 0.5, calib: {calib}, nsamples: 4, seqlen: 32}}
  - {{type: finetune, data: {data}, max_steps: 1, batch_size: 2, micro_batch_size: 2, seqlen: 32, groups: {groups},
      report_to: {report_to}}}
  - {{type: eval, models: [dense, prune, finetune], tasks: [ppl:builtin:python-docs:test]}}
"""
GOOD = {"calib": "builtin:python-docs:train", "data": str(SOME_DATA / "alpaca" / "alpaca_small.json"),
        "groups": 16, "report_to": "none"}


def dry_run(tmp_path, capsys, out=None, **changes):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(QUICK.format(out=out or tmp_path / "run", **{**GOOD, **changes}))
    return run_spp(["run", str(recipe), "--dry-run"], capsys)


def test_a_sound_recipe_passes_and_writes_nothing(tmp_path, capsys):
    code, out, err = dry_run(tmp_path, capsys)
    assert code == 0, err
    assert "is valid and its inputs check out" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


@pytest.mark.parametrize("changes, message", [
    ({"data": "/nonexistent/train.jsonl"}, "train.jsonl"),
    ({"calib": "c4"}, "needs the Hugging Face Hub, but this run is offline"),
    ({"groups": 64}, "groups 64 does not divide model.layers.0.mlp.gate_proj's 352 output rows: use groups 32"),
    ({"report_to": "wandb"}, "--report-to wandb needs the 'wandb' package"),
    ({"out": "/sys/spp-run"}, "cannot write '/sys/spp-run/prune'"),
])
def test_dry_run_refuses_what_would_fail_later(tmp_path, capsys, changes, message):
    code, _, err = dry_run(tmp_path, capsys, **changes)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_stage_refuses_an_unwritable_output_before_loading(tmp_path, capsys):
    code, _, err = run_spp(["prune", "builtin:tiny-llama", "--method", "magnitude", "--out", "/sys/spp-out"], capsys)
    assert code == 2 and "cannot write '/sys/spp-out'" in err

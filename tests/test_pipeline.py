"""`spp run`: stages in order, skip when unchanged, rerun what changed and everything after it, dry-run, report."""

import json

import pytest
from conftest import run_spp

RECIPE = """
model: {model}
output_dir: run
seed: 0
stages:
  - name: prune
    type: prune
    method: wanda
    pattern: "2:4"
    calib: {calib}
    nsamples: 4
    seqlen: 64
  - name: finetune
    type: finetune
    data: {data}
    max_steps: 3
    batch_size: 4
    micro_batch_size: 4
    seqlen: 64
    lr: 4e-3
  - name: eval
    type: eval
    models: [dense, prune, finetune]
    tasks: [ppl:{text}]
    seqlen: 64
    limit: 8
"""


@pytest.fixture
def recipe(tmp_path, random_model_dir, some_data):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        RECIPE.format(
            model=random_model_dir,
            calib=some_data / "c4" / "c4-train.00000-of-01024.first1000.jsonl",
            data=some_data / "alpaca" / "alpaca_small.json",
            text=some_data / "alpaca" / "alpaca_small.json",
        )
    )
    return path


def manifest(path):
    return json.loads((path / "spp.json").read_text())


def test_run_skips_unchanged_and_reruns_changed_stages(recipe, tmp_path, capsys):
    code, out, err = run_spp(["run", recipe, "--format", "json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    run = tmp_path / "run"
    assert [s["name"] for s in summary["stages"]] == ["prune", "finetune", "eval"]
    assert not any(s["skipped"] for s in summary["stages"])
    for stage in ("prune", "finetune", "eval"):
        assert (run / stage / "recipe.yaml").is_file()
    assert manifest(run / "finetune")["parent"]["manifest_sha256"] == manifest(run / "prune")["manifest_sha256"]
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"dense", "prune", "finetune"}
    assert results["models"]["prune"]["model"]["sparsity"] == 0.5
    assert (run / "report.md").is_file() and (run / "metrics.png").is_file() and (run / "loss.png").is_file()

    code, out, _ = run_spp(["run", recipe, "--format", "json"], capsys)
    assert code == 0 and all(s["skipped"] for s in json.loads(out)["stages"])

    prune_hash = manifest(run / "prune")["manifest_sha256"]
    code, out, _ = run_spp(["run", recipe, "stages.finetune.lr=1e-3", "--format", "json"], capsys)
    skipped = {s["name"]: s["skipped"] for s in json.loads(out)["stages"]}
    assert code == 0 and skipped == {"prune": True, "finetune": False, "eval": False}
    assert manifest(run / "prune")["manifest_sha256"] == prune_hash
    assert manifest(run / "finetune")["config"]["lr"] == 1e-3


def test_dry_run_refuses_a_hub_model_offline_without_loading_it(tmp_path, capsys):
    """The dry run checks what the run would need: offline, a model that is neither local nor cached is refused
    (tests/test_preflight.py has the sound recipe that passes)."""
    path = tmp_path / "r.yaml"
    path.write_text(
        RECIPE.format(model="org/not-downloaded", calib="c4", data="alpaca", text="builtin:python-docs:test")
    )
    code, _, err = run_spp(["run", path, "--dry-run", "--format", "json"], capsys)
    assert code == 2 and "'org/not-downloaded' is not a local folder and not in the Hugging Face cache" in err
    assert not (tmp_path / "run").exists()

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
    assert [s["state"] for s in summary["stages"]] == ["ran", "ran", "ran"]
    # the stage seconds are the stage's own measured time, the number report.md shows
    assert summary["stages"][0]["seconds"] == manifest(tmp_path / "run" / "prune")["seconds"]
    assert summary["notes"] == ["limit 8: only the first 8 examples (zero-shot) or windows (perplexity) per task were "
                                "scored; not comparable with full-protocol numbers"]
    for stage in ("prune", "finetune", "eval"):
        assert (run / stage / "recipe.yaml").is_file()
    assert manifest(run / "finetune")["parent"]["manifest_sha256"] == manifest(run / "prune")["manifest_sha256"]
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"dense", "prune", "finetune"}
    assert results["models"]["prune"]["model"]["sparsity"] == 0.5
    assert (run / "report.md").is_file() and (run / "metrics.png").is_file() and (run / "loss.png").is_file()

    code, out, _ = run_spp(["run", recipe, "--format", "json"], capsys)
    assert code == 0 and all(s["skipped"] for s in json.loads(out)["stages"])
    assert [s["state"] for s in json.loads(out)["stages"]] == ["skipped"] * 3

    prune_hash = manifest(run / "prune")["manifest_sha256"]
    code, out, _ = run_spp(["run", recipe, "stages.finetune.lr=1e-3", "--format", "json"], capsys)
    skipped = {s["name"]: s["skipped"] for s in json.loads(out)["stages"]}
    assert code == 0 and skipped == {"prune": True, "finetune": False, "eval": False}
    assert [s["state"] for s in json.loads(out)["stages"]] == ["skipped", "rerun", "rerun"]
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


def test_run_names_a_resumed_stage_and_where_it_resumed(tmp_path, random_model_dir, capsys):
    from spp_cli.recipe.resolve import load_recipe
    from spp_cli.stages.prune import prune

    path = tmp_path / "r.yaml"
    path.write_text(f"model: {random_model_dir}\noutput_dir: run\nstages:\n  - name: prune\n    type: prune\n"
                    "    method: magnitude\n    sparsity: 0.5\n")
    stage = load_recipe(path, []).stages[0]

    def crash_after_block_1(event):
        if event.kind == "block" and event.payload.index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # `spp run` interrupted in its prune stage after block 1 of 2
        prune(str(random_model_dir), tmp_path / "run" / "prune", on_event=crash_after_block_1,
              **stage.command_options())
    code, out, err = run_spp(["run", path], capsys)
    assert code == 0, err
    work = tmp_path / "run" / ".prune.spp-work"
    assert f"spp: resuming at block 2 of 2 (block 1 kept from the interrupted run at {work})" in err.splitlines()
    seconds = manifest(tmp_path / "run" / "prune")["seconds"]
    assert out.splitlines()[-2:] == [
        f"stage prune (prune): resumed after block 1 of the interrupted run, {seconds:.1f} s -> "
        f"{tmp_path / 'run' / 'prune'}",
        f"report: {tmp_path / 'run' / 'report.md'}"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["stages"][0] | {"seconds": 0} == {
        "name": "prune", "type": "prune", "output": str(tmp_path / "run" / "prune"), "skipped": False,
        "state": "resumed", "resumed_from": "after block 1", "seconds": 0}

"""`spp prune --refine reconstruct` (pruners/reconstruct.py) through the prune stage: a lower held-out perplexity,
each block's errors in spp.json, its options recorded only when used, streamed = in memory byte for byte (so the
same bytes for the same seed), and a kill -9 resumed bit-identically."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_prune_streaming import assert_same_output, save_random

from spp_cli.stages.evaluate import evaluate_models
from spp_cli.stages.prune import prune
from spp_cli.stages.prune_streaming import staging_path

TINY = "builtin:tiny-llama"
CALIB = {"calib": "builtin:python-docs:train", "nsamples": 8, "seqlen": 64, "device": "cpu"}
FAST = {"refine": "reconstruct", "reconstruct_epochs": 2, "reconstruct_batch_size": 4}
KEYS = ("reconstruct_epochs", "reconstruct_lr", "reconstruct_batch_size", "reconstruct_weight_decay",
        "reconstruct_warmup_steps", "reconstruct_params")


def test_reconstruct_lowers_the_held_out_perplexity_and_records_each_block(tmp_path):
    options = dict(method="wanda", sparsity=0.7, dtype="float32", **{**CALIB, "seqlen": 128})
    plain = prune(TINY, tmp_path / "plain", **options)
    refined = prune(TINY, tmp_path / "refined", **options, refine="reconstruct", reconstruct_epochs=3)
    errors = refined["reconstruct"]["block_error"]
    assert refined["reconstruct"]["params"] == "weights" and sorted(errors) == ["0", "1", "2", "3"]
    assert all(block["after"] < block["before"] for block in errors.values()), errors
    assert [refined["config"][key] for key in KEYS] == [3, 2e-4, 8, 0.1, 0, "weights"]  # EBFT's, but the epochs
    assert "reconstruct" not in plain and not set(KEYS) & set(plain["config"])
    assert refined["fingerprint"] != plain["fingerprint"]
    for name, layer in plain["layers"].items():  # the same sparsity; block 0 (the same inputs): the same zeros
        assert refined["layers"][name]["sparsity"] == layer["sparsity"], name
        if ".layers.0." in name:
            assert refined["layers"][name]["zeros_sha256"] == layer["zeros_sha256"], name
    scores = evaluate_models({"plain": str(tmp_path / "plain"), "refined": str(tmp_path / "refined")},
                             ["ppl:builtin:python-docs:test"], tmp_path / "results.json", seqlen=128, limit=8,
                             device="cpu", dtype="float32")["models"]
    ppl = {name: entry["perplexity"]["ppl:builtin:python-docs:test"]["value"] for name, entry in scores.items()}
    assert ppl["refined"] < ppl["plain"], ppl


def test_magnitude_with_reconstruct_keeps_magnitudes_zeros_and_reads_calibration(tmp_path):
    plain = prune(TINY, tmp_path / "plain", method="magnitude", pattern="2:4")
    refined = prune(TINY, tmp_path / "refined", method="magnitude", pattern="2:4", **CALIB, **FAST)
    assert refined["config"]["calib"] == CALIB["calib"] and refined["config"]["nsamples"] == 8
    assert {n: layer["zeros_sha256"] for n, layer in refined["layers"].items()} == {
        n: layer["zeros_sha256"] for n, layer in plain["layers"].items()}
    assert all(refined["layers"][n]["weight_sha256"] != layer["weight_sha256"] for n, layer in plain["layers"].items())


@pytest.mark.parametrize("method, options", [
    ("sparsegpt", {"pattern": "2:4", "dtype": "float32"}),
    ("wanda", {"sparsity": 0.6, "refine": "dsnot+reconstruct"}),
], ids=["sparsegpt-2:4-float32", "wanda-dsnot-float16"])
def test_streamed_and_in_memory_write_the_same_bytes(tmp_path, method, options):
    """Two separate runs of the same options and seed: also the determinism check (another seed: the unit tests)."""
    options = {**CALIB, **FAST, **options, "method": method}
    memory = prune(TINY, tmp_path / "memory", streaming="off", **options)
    streamed = prune(TINY, tmp_path / "stream", streaming="on", **options)
    assert_same_output(tmp_path / "stream", tmp_path / "memory")
    assert streamed["manifest_sha256"] == memory["manifest_sha256"] and len(memory["reconstruct"]["block_error"]) == 4


def assert_an_adapters_prune(model: str, tmp_path, options: dict, streamed: dict) -> None:
    """reconstruct_params spp | masked-lora (`streamed`: its streamed prune, in tmp_path / "whole"): in memory the
    same bytes, each block's error lower after, every N:M group kept, and block 0 (the same inputs as the unrefined
    prune) with the unrefined prune's zeros and other kept values."""
    memory = prune(model, tmp_path / "memory", streaming="off", **options)
    assert_same_output(tmp_path / "whole", tmp_path / "memory")
    assert streamed["manifest_sha256"] == memory["manifest_sha256"]
    assert memory["reconstruct"]["params"] == memory["config"]["reconstruct_params"] == options["reconstruct_params"]
    errors = memory["reconstruct"]["block_error"]
    assert len(errors) == 4 and all(block["after"] < block["before"] for block in errors.values()), errors
    plain = prune(model, tmp_path / "plain", **{k: v for k, v in options.items() if not k.startswith("reconstruct")
                                                  and k != "refine"})
    for name, layer in plain["layers"].items():
        assert memory["layers"][name]["sparsity"] == layer["sparsity"] == 0.5, name
        if ".layers.0." in name:
            assert memory["layers"][name]["zeros_sha256"] == layer["zeros_sha256"], name
            assert memory["layers"][name]["weight_sha256"] != layer["weight_sha256"], name


@pytest.mark.parametrize("params", ["weights", "spp", "masked-lora"])
def test_kill_9_during_a_reconstructed_prune_resumes_bit_identically(tmp_path, params):
    """With an adapter (wanda 2:4) also assert_an_adapters_prune: streamed = in memory, errors, zeros."""
    model = str(save_random(tmp_path / "llama", "llama", shard="60KB"))
    sparsity = {"sparsity": 0.5} if params == "weights" else {"pattern": "2:4"}
    options = dict(method="wanda", **sparsity, **{**CALIB, "seqlen": 32}, **FAST, reconstruct_params=params)
    whole = prune(model, tmp_path / "whole", **options)
    if params != "weights":
        assert_an_adapters_prune(model, tmp_path, options, whole)
    out = tmp_path / "killed"
    script = (  # SIGKILL from block 1's report hook, after its state is saved
        "import os, signal\n"
        "from spp_cli.stages.prune import prune\n"
        "def on_event(event):\n"
        "    if event.kind == \"block\" and event.payload.index == 1:\n"
        f"        os.kill(os.getpid(), {int(signal.SIGKILL)})\n"
        f"prune({model!r}, {str(out)!r}, on_event=on_event, **{options!r})\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO),
                                 "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert killed.returncode == -9, killed.stderr
    assert json.loads((staging_path(out) / "resume.json").read_text())["next_block"] == 2
    resumed = prune(model, out, **options)
    assert resumed["resumed_from_block"] == 2
    assert resumed["reconstruct"] == whole["reconstruct"] and len(resumed["reconstruct"]["block_error"]) == 4
    assert resumed["manifest_sha256"] == whole["manifest_sha256"]
    assert_same_output(out, tmp_path / "whole")


@pytest.mark.parametrize("refine", ["none", "dsnot", "reconstruct", "dsnot+reconstruct"])
@pytest.mark.parametrize("changed", [{}, {"reconstruct_epochs": 3}, {"reconstruct_params": "spp"},
                                     {"reconstruct_params": "masked-lora"},
                                     {"reconstruct_lr": 1e-3, "reconstruct_warmup_steps": 2}])
def test_the_schema_and_the_driver_agree_on_reconstructs_options(refine, changed):
    from test_prune_stage import _driver_accepts, _schema_accepts

    options = dict(method="wanda", pattern="unstructured", refine=refine, **changed)
    assert _schema_accepts(options) == _driver_accepts(options)
    assert _schema_accepts(options) == ("reconstruct" in refine or not changed)


def test_the_schema_offers_the_drivers_reconstruct_params():
    from pruners.reconstruct_params import RECONSTRUCT_PARAMS
    from spp_cli.recipe.schema import RECONSTRUCT_PARAMS as OFFERED

    assert OFFERED == RECONSTRUCT_PARAMS == ("weights", "spp", "masked-lora")


def test_reconstructs_options_are_recorded_after_refine_and_only_with_it():
    from pruners.masks import parse_pattern
    from spp_cli.recipe.resolve import validate_options
    from spp_cli.recipe.schema import PruneStage
    from spp_cli.stages.prune import recorded_options

    def recorded(**options):
        stage = validate_options(PruneStage, {"method": "wanda", "min_expert_tokens": 8, **options})
        return list(recorded_options(stage, parse_pattern(stage.pattern, stage.sparsity)))

    assert recorded(refine="dsnot")[-2:] == ["refine", "min_expert_tokens"]
    assert recorded(refine="reconstruct")[-8:] == ["refine", *KEYS, "min_expert_tokens"]
    assert recorded(refine="dsnot+reconstruct", reconstruct_epochs=1)[-8:] == ["refine", *KEYS, "min_expert_tokens"]


def test_reconstruct_params_reaches_the_fingerprint_from_a_recipe_and_the_command(tmp_path):
    from typer.testing import CliRunner

    from pruners.masks import parse_pattern
    from spp_cli.cli import app
    from spp_cli.io.outputs import fingerprint
    from spp_cli.recipe.resolve import load_recipe, validate_options
    from spp_cli.recipe.schema import PruneStage
    from spp_cli.stages.prune import recorded_options

    def config(**options):
        stage = validate_options(PruneStage, {"method": "wanda", "refine": "reconstruct", **options})
        return recorded_options(stage, parse_pattern(stage.pattern, stage.sparsity))

    prints = {params: fingerprint(config(reconstruct_params=params), "parent")
              for params in ("weights", "spp", "masked-lora")}
    assert len(set(prints.values())) == 3 and config(reconstruct_params="spp")["reconstruct_params"] == "spp"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: builtin:tiny-llama\noutput_dir: out\nstages:\n  - name: prune\n    type: prune\n"
                      "    method: wanda\n    refine: reconstruct\n    reconstruct_params: masked-lora\n")
    assert load_recipe(recipe).stages[0].reconstruct_params == "masked-lora"
    result = CliRunner().invoke(app, ["prune", "--help"], terminal_width=200)
    assert "--reconstruct-params" in result.output and "masked-lora" in result.output

"""The whole chain on real data, through the CLI: the tiny model calibrated on the C4 slice, SPP-tuned on the
Alpaca subset, evaluated on WikiText-2 test and the 8 zero-shot tasks (with --limit), all from $SPP_TEST_DATA."""

import json

import pytest
from conftest import run_spp
from safetensors.torch import load_file

TASKS = "wikitext2,boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,piqa"


@pytest.mark.slow
def test_prune_tune_evaluate_on_real_data(tmp_path, test_data, capsys):
    pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
    code, _, err = run_spp(
        [
            "prune",
            "builtin:tiny-llama",
            "--method",
            "sparsegpt",
            "--pattern",
            "2:4",
            "--calib",
            test_data / "c4" / "c4-train.00000-of-01024.first1000.jsonl",
            "--nsamples",
            "32",
            "--seqlen",
            "256",
            "--out",
            pruned,
        ],
        capsys,
    )
    assert code == 0, err
    code, _, err = run_spp(
        [
            "finetune",
            pruned,
            "--data",
            test_data / "alpaca" / "alpaca_small.json",
            "--max-steps",
            "40",
            "--batch-size",
            "16",
            "--micro-batch-size",
            "16",
            "--seqlen",
            "256",
            "--dropout",
            "0",
            "--val-size",
            "0",
            "--out",
            tuned,
        ],
        capsys,
    )
    assert code == 0, err

    prune_manifest = json.loads((pruned / "spp.json").read_text())
    tune_manifest = json.loads((tuned / "spp.json").read_text())
    assert tune_manifest["parent"]["manifest_sha256"] == prune_manifest["manifest_sha256"]
    weights = load_file(tuned / "model.safetensors")
    assert len(tune_manifest["layers"]) == 28  # 7 linears x 4 blocks
    for name in tune_manifest["layers"]:
        weight = weights[f"{name}.weight"]
        zeros_per_group = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1)
        assert bool((zeros_per_group == 2).all()), name  # exact 2:4, nothing lost, nothing added
    code, out, err = run_spp(["verify", tuned, "--against", pruned], capsys)
    assert code == 0, err

    results_file = tmp_path / "results.json"
    code, _, err = run_spp(
        [
            "eval",
            pruned,
            tuned,
            "--tasks",
            TASKS,
            "--data-dir",
            test_data,
            "--limit",
            "8",
            "--seqlen",
            "256",
            "--batch-size",
            "8",
            "--out",
            results_file,
        ],
        capsys,
    )
    assert code == 0, err
    results = json.loads(results_file.read_text())["models"]
    entries = list(results.values())
    after_prune, after_spp = entries[0], entries[1]
    for entry in entries:
        for task in TASKS.split(",")[1:]:
            assert 0.0 <= entry["results"][task]["acc,none"] <= 1.0
        assert entry["perplexity"]["wikitext2"]["seqlen"] == 256
        assert entry["mean_acc_7"] is not None
    assert after_spp["perplexity"]["wikitext2"]["value"] < after_prune["perplexity"]["wikitext2"]["value"]

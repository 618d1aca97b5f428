"""The prune stage with OWL, DSnoT and a mixture-of-experts model: what spp.json records, and the saved weights."""

import json

import pytest
import torch
import transformers
from tiny_models import random_model, save_random_model

import spp_cli
from spp_cli.io.manifest import weight_sha256


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune-options")
    dense = root / "dense"
    save_random_model(dense, num_hidden_layers=4)
    mixtral = random_model("mixtral", num_key_value_heads=2)
    with torch.no_grad():
        for block in mixtral.model.layers:
            block.mlp.gate.weight.normal_(0, 0.5)
    save_random_model(root / "mixtral", model=mixtral)
    text = "def f(x): return x * 2 # a comment about the code " * 60
    (root / "calib.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(20)))
    return root


def run(inputs, model, out, **options):
    return spp_cli.prune(str(inputs / model), inputs / out, calib=str(inputs / "calib.jsonl"), nsamples=4, seqlen=64,
                         device="cpu", **{"method": "wanda", "sparsity": 0.5, **options})


def test_default_run_has_no_new_manifest_keys(inputs):
    manifest = run(inputs, "dense", "uniform")
    assert not {"sparsity_profile", "refine", "expert_fallbacks", "warnings"} & set(manifest)
    assert not {"sparsity_profile", "refine", "min_expert_tokens"} & set(manifest["config"])


def test_owl_records_each_block_sparsity(inputs):
    manifest = run(inputs, "dense", "owl", method="sparsegpt", sparsity=0.6, sparsity_profile="owl")
    profile = manifest["sparsity_profile"]
    ratios = [profile["layer_sparsity"][str(i)] for i in range(4)]
    assert profile["profile"] == "owl" and profile["threshold"] == 5.0 and profile["lambda"] == 0.08
    assert abs(sum(ratios) / 4 - 0.6) < 1e-6 and abs(max(ratios) - min(ratios) - 0.16) < 1e-6
    assert set(profile["outlier_ratio"]) == {"0", "1", "2", "3"}
    for name, record in manifest["layers"].items():  # SparseGPT: int(128*s)+1 zeros per 128-column block
        block = int(name.split(".")[2])
        rows, cols = record["shape"]
        expected = (int(rows * min(cols, 128) * ratios[block]) + 1) * (cols // 128 or 1) / (rows * cols)
        assert abs(record["sparsity"] - expected) < 1e-6, name
    assert manifest["config"]["sparsity_profile"] == "owl" and manifest["config"]["owl_lambda"] == 0.08
    saved = json.loads((inputs / "owl" / "spp.json").read_text())
    assert saved["sparsity_profile"] == profile


def test_dsnot_is_recorded_and_keeps_the_sparsity(inputs):
    plain = run(inputs, "dense", "plain-2-4", pattern="2:4", sparsity=None)
    refined = run(inputs, "dense", "dsnot-2-4", pattern="2:4", sparsity=None, refine="dsnot")
    assert refined["refine"] == "dsnot" and refined["config"]["refine"] == "dsnot"
    assert refined["fingerprint"] != plain["fingerprint"]
    layers, plain_layers = refined["layers"], plain["layers"]
    assert {n: r["sparsity"] for n, r in layers.items()} == {n: r["sparsity"] for n, r in plain_layers.items()}
    assert sum(layers[n]["zeros_sha256"] != plain_layers[n]["zeros_sha256"] for n in plain_layers) > 0


def test_mixtral_end_to_end_with_expert_fallback(inputs):
    manifest = run(inputs, "mixtral", "mixtral-pruned", min_expert_tokens=10**6)  # every expert falls back
    experts = [n for n in manifest["layers"] if ".experts." in n]
    assert len(experts) == 2 * 4 * 3 and not any(n.endswith("mlp.gate") for n in manifest["layers"])
    assert set(manifest["expert_fallbacks"]) == set(experts)
    assert all(f["method"] == "magnitude" and 0 <= f["tokens"] < 10**6 for f in manifest["expert_fallbacks"].values())
    assert len(manifest["warnings"]) == 1 and "magnitude" in manifest["warnings"][0]
    assert all(abs(manifest["layers"][n]["sparsity"] - 0.5) < 0.01 for n in experts)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(inputs / "mixtral-pruned")
    fused = reloaded.model.layers[1].mlp.experts
    half = fused.gate_up_proj.shape[1] // 2
    assert weight_sha256(fused.gate_up_proj[3, half:]) == manifest["layers"]["model.layers.1.mlp.experts.3.up_proj"][
        "weight_sha256"]
    assert weight_sha256(fused.down_proj[0]) == manifest["layers"]["model.layers.1.mlp.experts.0.down_proj"][
        "weight_sha256"]
    routed = run(inputs, "mixtral", "mixtral-routed")  # the default minimum: experts use their own statistics
    fallbacks = routed.get("expert_fallbacks", {})  # the default minimum (16): only rarely chosen experts fall back
    assert all(f["tokens"] < 16 for f in fallbacks.values()) and len(fallbacks) < len(experts)
    tokens = {n: f["tokens"] for n, f in manifest["expert_fallbacks"].items() if ".layers.0." in n}  # block 0
    # routes the same dense inputs in both runs
    assert {n for n, t in tokens.items() if t < 16} == {n for n in fallbacks if ".layers.0." in n}

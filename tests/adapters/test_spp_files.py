"""SPP adapter files (PEFT's layout): save -> load -> merge is bit-identical, a base with another mask is refused,
saving is atomic."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import decoder_linears, pruned_tiny_llama, randomize_adapters

from spp_cli.adapters.spp import SPPConfig, inject_spp, merge_spp
from spp_cli.adapters.spp_files import load_spp_adapter, save_spp_adapter
from spp_cli.errors import BadInput
from spp_cli.manifest import zeros_sha256


def trained_like_model(pattern="2:4"):
    model = pruned_tiny_llama(pattern)
    config = SPPConfig()
    inject_spp(model, decoder_linears(model), config)
    randomize_adapters(model, beta_std=0.5)
    return model, config


def test_save_load_merge_is_bit_identical(tmp_path):
    model, config = trained_like_model()
    adapter = tmp_path / "run" / "adapter"
    save_spp_adapter(model, adapter, config, base_path="prune/", base_manifest_sha256="abc123")
    merge_spp(model)

    fresh = pruned_tiny_llama("2:4")
    loaded = load_spp_adapter(fresh, adapter, base_manifest_sha256="abc123")
    merge_spp(fresh)
    assert loaded.groups == 16 and loaded.scale == 2.0 and loaded.target_modules == decoder_linears(fresh)
    want, got = model.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys() == pruned_tiny_llama("2:4").state_dict().keys()  # original key names
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_adapter_files_layout(tmp_path):
    model, config = trained_like_model()
    save_spp_adapter(model, tmp_path / "adapter", config, base_path="prune/", base_manifest_sha256=None)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                      "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp dirs left behind
    data = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    names = decoder_linears(pruned_tiny_llama())
    assert data["peft_type"] == "SPP" and data["groups"] == 16 and data["scale"] == 2.0 and data["r"] == 8
    assert data["lora_alpha"] == 16 and data["dropout"] == 0.05 and data["target_modules"] == names
    assert data["base_model_name_or_path"] == "prune/" and data["base_manifest_sha256"] is None
    assert data["base_zeros_sha256"] == {n: zeros_sha256(model.get_submodule(n).base.weight) for n in names}
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sorted(tensors) == sorted([f"{n}.spp_alpha" for n in names] + [f"{n}.spp_beta" for n in names])
    assert tensors[f"{names[0]}.spp_alpha"].shape == (16, 64) and tensors[f"{names[0]}.spp_beta"].shape == (64,)


def test_save_over_an_existing_adapter_replaces_it(tmp_path):
    model, config = trained_like_model()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "stale.txt").write_text("old")
    save_spp_adapter(model, tmp_path / "adapter", config, base_path="p", base_manifest_sha256=None)
    assert not (tmp_path / "adapter" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_load_refuses_a_base_with_another_mask(tmp_path):
    model, config = trained_like_model("2:4")
    save_spp_adapter(model, tmp_path / "adapter", config, base_path="prune/", base_manifest_sha256="abc123")
    other = pruned_tiny_llama("4:8")
    with pytest.raises(BadInput, match="different zero mask") as error:
        load_spp_adapter(other, tmp_path / "adapter")
    assert "\n" not in str(error.value)
    assert not any(n.endswith("spp_alpha") for n, _ in other.named_parameters())  # refused before any change
    with pytest.raises(BadInput, match="trained on base manifest abc123"):
        load_spp_adapter(pruned_tiny_llama("2:4"), tmp_path / "adapter", base_manifest_sha256="def456")


def test_load_rejects_a_missing_or_foreign_adapter(tmp_path):
    with pytest.raises(BadInput, match="adapter_config.json not found"):
        load_spp_adapter(pruned_tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(BadInput, match="not 'SPP'"):
        load_spp_adapter(pruned_tiny_llama(), tmp_path)

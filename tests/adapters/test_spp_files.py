"""SPP adapter files (PEFT's layout), written and read by the adapter interface's one save/load path: save -> load ->
merge is bit-identical, a base with another mask is refused, saving is atomic, and the files are byte for byte those
spp wrote before SPP used that path (adapters/spp_files.py, commit 64e02f8)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import decoder_linears, pruned_tiny_llama, randomize_adapters

from spp_cli.adapters.spp import SPPAdapter, SPPConfig, load_spp_adapter, merge_spp, spp_layers
from spp_cli.errors import BadInput
from spp_cli.io.manifest import zeros_sha256
from spp_cli.io.ownership import RECORD


def trained_like_model(pattern="2:4"):
    model = pruned_tiny_llama(pattern)
    adapter = SPPAdapter(SPPConfig())
    adapter.inject(model, decoder_linears(model))
    randomize_adapters(model, beta_std=0.5)
    return model, adapter


def test_save_load_merge_is_bit_identical(tmp_path):
    model, adapter = trained_like_model()
    adapter_dir = tmp_path / "run" / "adapter"
    adapter.save(model, adapter_dir, base_path="prune/", base_manifest_sha256="abc123")
    merge_spp(model)

    fresh = pruned_tiny_llama("2:4")
    loaded = load_spp_adapter(fresh, adapter_dir, base_manifest_sha256="abc123")
    merge_spp(fresh)
    assert loaded.groups == 16 and loaded.scale == 2.0 and loaded.target_modules == decoder_linears(fresh)
    want, got = model.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys() == pruned_tiny_llama("2:4").state_dict().keys()  # original key names
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_adapter_files_layout(tmp_path):
    model, adapter = trained_like_model()
    adapter.save(model, tmp_path / "adapter", base_path="prune/", base_manifest_sha256=None)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [RECORD, "adapter_config.json",
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
    model, adapter = trained_like_model()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "stale.txt").write_text("old")
    adapter.save(model, tmp_path / "adapter", base_path="p", base_manifest_sha256=None)
    assert not (tmp_path / "adapter" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_load_refuses_a_base_with_another_mask(tmp_path):
    model, adapter = trained_like_model("2:4")
    adapter.save(model, tmp_path / "adapter", base_path="prune/", base_manifest_sha256="abc123")
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


def tiny_mixtral():
    """A random Mixtral with fused experts (transformers 5: gate_up_proj (4, 256, 64), down_proj (4, 64, 128)), half
    of every target weight zero; (model, targets: the attention linears and every expert's slices)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    targets = []
    with torch.no_grad():
        for index, block in enumerate(model.model.layers):
            attention = [f"model.layers.{index}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            weights = [model.get_submodule(name).weight for name in attention]
            for weight in [*weights, block.mlp.experts.gate_up_proj, block.mlp.experts.down_proj]:
                weight[weight.abs() < weight.abs().median()] = 0
            targets += attention + [f"model.layers.{index}.mlp.experts.{e}.{p}" for e in range(4)
                                    for p in ("gate_proj", "up_proj", "down_proj")]
    return model, targets


def pruned_llama():
    model = pruned_tiny_llama("2:4")
    return model, decoder_linears(model)


@pytest.mark.parametrize("build, groups, dropout", [(pruned_llama, 16, 0.05), (tiny_mixtral, 4, 0.0)],
                         ids=["llama", "mixtral-experts"])
def test_files_are_those_spp_wrote_before_it_used_the_adapter_interface(tmp_path, build, groups, dropout):
    """The layout of adapters/spp_files.py's writer (commit 64e02f8), spelled out: an adapter saved before loads and
    merges the same, and one saved now is byte for byte what that writer made."""
    from safetensors.torch import save_file

    from pruners.experts import weight_of
    from spp_cli.adapters.spp_experts import spp_expert_parametrizations

    model, targets = build()
    adapter = SPPAdapter(SPPConfig(groups=groups, dropout=dropout))
    adapter.inject(model, targets)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, parameter in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    adapter.save(model, tmp_path / "new", base_path="prune/", base_manifest_sha256="abc123")

    experts = spp_expert_parametrizations(model)
    assert bool(experts) == (build is tiny_mixtral) and sorted(adapter.target_modules()) == sorted(targets)
    targets = list(spp_layers(model)) + [name for name in adapter.target_modules() if ".experts." in name]
    config = {"peft_type": "SPP", "groups": groups, "scale": 2.0, "lora_alpha": 16, "r": 8, "dropout": dropout,
              "target_modules": targets, "forward": "auto",
              **({"experts_forward": "fused, no branch dropout"} if experts else {}),
              "base_model_name_or_path": "prune/", "base_manifest_sha256": "abc123",
              "base_zeros_sha256": {name: zeros_sha256(weight_of(model, name)) for name in targets}}
    tensors = {}
    for name, layer in [*spp_layers(model).items(), *experts.items()]:
        tensors[f"{name}.spp_alpha"], tensors[f"{name}.spp_beta"] = layer.spp_alpha.detach(), layer.spp_beta.detach()
    before = tmp_path / "before"
    before.mkdir()
    (before / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(before / "adapter_model.safetensors"), metadata={"format": "pt"})
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "new" / file).read_bytes() == (before / file).read_bytes(), file

    want = adapter.merge(model).state_dict()
    loaded, adapted = SPPAdapter.load(build()[0], before)
    got = loaded.merge(adapted).state_dict()
    assert loaded.record() == adapter.record() and want.keys() == got.keys()
    assert all(torch.equal(want[key], got[key]) for key in want)

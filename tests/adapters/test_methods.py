"""Every recovery method through the adapter interface: exact start, merge = unmerged forward, every zero kept
(unstructured and 2:4) by the zero-keeping methods, LoRA dense; the torch-free registry; bad options."""

import subprocess
import sys

import pytest
import torch
from tiny_models import batch_ids, decoder_linears, pruned_tiny_llama, random_model, relative_error
from torch import nn

from spp_cli.adapters import METHODS, REGISTRY, adapter_class
from spp_cli.errors import BadInput
from spp_cli.io.manifest import zeros_sha256
from spp_cli.io.ownership import RECORD
from spp_cli.recipe.schema import FinetuneStage

ZERO_KEEPING = [name for name, method in REGISTRY.items() if method.keeps_zeros]


def adapter_for(method: str, **options):
    return adapter_class(method).from_options(FinetuneStage(data="d.jsonl", method=method, **options))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def perturb_trainable(model: nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    """Move every trainable parameter away from its initial value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def plain_linears(model: nn.Module) -> bool:
    return all(type(model.get_submodule(name)) is nn.Linear for name in decoder_linears(model))


def test_registry_is_torch_free_and_the_schema_offers_its_names():
    code = ("import sys; import spp_cli.adapters, spp_cli.recipe.schema as s; "
            "print(int('torch' in sys.modules), ','.join(s.FinetuneStage.__dataclass_fields__['method']"
            ".metadata['spp'].choices))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", ",".join(METHODS)]
    assert METHODS == ("spp", "lora", "masked-lora", "ia3", "masked-full")
    assert ZERO_KEEPING == ["spp", "masked-lora", "ia3", "masked-full"]


def test_registry_defaults_are_the_spp_config_defaults():
    from spp_cli.adapters.spp import SPPConfig

    config = adapter_for("spp").config
    assert (config.groups, config.dropout, config.forward, config.r, config.lora_alpha) == (16, 0.05, "auto", 8, 16)
    spp = SPPConfig()
    assert (spp.groups, spp.dropout, spp.forward, spp.r, spp.lora_alpha) == (16, 0.05, "auto", 8, 16)


FIX = "; drop it or change the method"
MISPLACED = [
    ("lora", {"groups": 8}, "--groups: applies to method spp, not lora" + FIX),
    ("ia3", {"lora_r": 4}, "--lora-r: applies to method spp or lora or masked-lora, not ia3" + FIX),
    ("masked-full", {"dropout": 0.1}, "--dropout: applies to method spp or lora or masked-lora, not masked-full" + FIX),
    ("masked-lora", {"forward": "fused"}, "--forward: applies to method spp, not masked-lora" + FIX),
    ("qlora", {}, "--method: 'qlora' is not one of spp, lora, masked-lora, ia3, masked-full; did you mean 'lora'?"),
]


@pytest.mark.parametrize(("method", "options", "message"), MISPLACED)
def test_an_option_of_another_method_or_an_unknown_method_is_bad_input(method, options, message):
    """One rule, the schema's (FinetuneStage.check with adapters.misplaced_option), for every entry point."""
    from spp_cli.recipe.resolve import validate_options
    from spp_cli.recipe.schema import FinetuneStage

    with pytest.raises(BadInput) as error:
        validate_options(FinetuneStage, {"data": "d.jsonl", "method": method, **options}, flags=True)
    assert str(error.value) == message


@pytest.mark.parametrize("method", METHODS)
def test_at_init_the_adapted_model_is_the_pruned_model_exactly(method):
    model = pruned_tiny_llama(init_std=0.3)
    ids = batch_ids()
    want = logits(model, ids)
    torch.manual_seed(0)
    adapted = adapter_for(method).inject(model, decoder_linears(model)).eval()
    assert torch.equal(logits(adapted, ids), want)
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and not any("embed" in name or "norm" in name or "lm_head" in name for name in trainable)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", ZERO_KEEPING)
def test_merge_equals_the_adapted_forward_and_keeps_every_zero(method, pattern):
    model = pruned_tiny_llama(pattern, init_std=0.3)
    names = decoder_linears(model)
    before = {name: model.get_submodule(name).weight.detach().clone() for name in names}
    adapter = adapter_for(method, **({"dropout": 0.0} if "dropout" in REGISTRY[method].options else {}))
    adapted = adapter.inject(model, names)
    perturb_trainable(adapted)
    if method == "masked-full":
        adapter.after_optimizer_step(adapted)  # what the trainer does after each step
    adapted.eval()
    ids = batch_ids()
    unmerged = logits(adapted, ids)
    merged = adapter.merge(adapted)
    assert plain_linears(merged)
    assert relative_error(logits(merged, ids), unmerged) < 1e-5
    for name in names:
        weight = merged.get_submodule(name).weight
        assert int(((before[name] == 0) & (weight != 0)).sum()) == 0  # no zero revived
        assert not torch.equal(weight, before[name])  # and the update did reach the layer
    if pattern == "2:4":
        zeros_per_group = (merged.get_submodule(names[0]).weight.reshape(-1, 4) == 0).sum(-1)
        assert int(zeros_per_group.min()) >= 2
    assert set(merged.state_dict()) == set(pruned_tiny_llama(pattern).state_dict())  # the original keys


def test_lora_merge_is_dense():
    model = pruned_tiny_llama(init_std=0.3)
    names = decoder_linears(model)
    before = {name: zeros_sha256(model.get_submodule(name).weight) for name in names}
    adapter = adapter_for("lora")
    assert not adapter.keeps_zeros
    adapted = adapter.inject(model, names)
    perturb_trainable(adapted)
    merged = adapter.merge(adapted)
    assert plain_linears(merged)
    assert all(zeros_sha256(merged.get_submodule(n).weight) != before[n] for n in names)


def test_lora_record_is_peft_config_not_hard_coded():
    model = pruned_tiny_llama()
    names = decoder_linears(model)
    adapter = adapter_for("lora", lora_r=4, lora_alpha=32.0, dropout=0.1)
    adapter.inject(model, names)
    record = adapter.record()
    assert (record["peft_type"], record["r"], record["lora_alpha"], record["lora_dropout"]) == ("LORA", 4, 32.0, 0.1)
    assert record["target_modules"] == sorted(names)


def test_masked_full_gradient_and_weight_decay_never_revive_a_zero():
    model = pruned_tiny_llama(init_std=0.3)
    names = decoder_linears(model)
    adapter = adapter_for("masked-full")
    adapted = adapter.inject(model, names)
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = batch_ids()
    for _ in range(3):
        loss = adapted(ids, labels=ids).loss
        loss.backward()
        weight = adapted.get_submodule(names[0]).weight
        assert int(weight.grad[weight == 0].count_nonzero()) == 0  # the hook masked it
        optimizer.step()
        adapter.after_optimizer_step(adapted)
        optimizer.zero_grad()
    merged = adapter.merge(adapted)
    pruned = pruned_tiny_llama(init_std=0.3)
    for name in names:
        assert zeros_sha256(merged.get_submodule(name).weight) == zeros_sha256(pruned.get_submodule(name).weight)
    assert not hasattr(merged.get_submodule(names[0]), "spp_support")  # a plain nn.Linear again


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_loads_onto_a_fresh_base_and_merges_the_same(method, tmp_path):
    model = pruned_tiny_llama("2:4", init_std=0.3)
    names = decoder_linears(model)
    adapter = adapter_for(method)
    adapted = adapter.inject(model, names)
    perturb_trainable(adapted)
    adapter.after_optimizer_step(adapted)
    adapter.save(adapted, tmp_path / "adapter", base_path="base", base_manifest_sha256=None)
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", RECORD} <= files <= {
        "adapter_config.json", "adapter_model.safetensors", "README.md", RECORD}  # RECORD: spp_cli/io/ownership.py
    loaded, reloaded = adapter_class(method).load(pruned_tiny_llama("2:4", init_std=0.3), tmp_path / "adapter")
    want, got = adapter.merge(adapted).state_dict(), loaded.merge(reloaded).state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(BadInput, match="different zero mask"):
        adapter_class(method).load(pruned_tiny_llama("unstructured", init_std=0.3), tmp_path / "adapter")


def test_peft_records_do_not_depend_on_where_the_base_lives(tmp_path):
    records = []
    for where in ("a", "b"):
        model = pruned_tiny_llama()
        adapter = adapter_for("ia3")
        adapted = adapter.inject(model, decoder_linears(model))
        adapter.save(adapted, tmp_path / where / "adapter", base_path=str(tmp_path / where), base_manifest_sha256=None)
        records.append(adapter.record())
    assert records[0] == records[1] and "base_model_name_or_path" not in records[0]
    assert records[0]["peft_type"] == "IA3" and records[0]["feedforward_modules"] == sorted(
        n for n in decoder_linears(pruned_tiny_llama()) if n.endswith("down_proj"))


@pytest.mark.parametrize("method", ZERO_KEEPING)
def test_gemma3_sliding_and_global_attention_adapts_and_merges_keeping_every_zero(method):
    """Gemma3 (random-init, sliding + full attention, GQA, qk-norm): identity at init, merge equals the adapted
    forward, and no zero revived — the fine-tuning side of the architecture tests."""
    from pruners.blocks import prunable_linears

    model = random_model("gemma3", vocab_size=128, num_key_value_heads=2, max_position_embeddings=64, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"], attn_implementation="eager")
    names = list(prunable_linears(model))
    with torch.no_grad():
        for name in names:
            weight = model.get_submodule(name).weight
            weight.mul_(weight.abs() > weight.abs().median())  # 50% magnitude zeros
    before = {name: model.get_submodule(name).weight.detach().clone() for name in names}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    pruned = logits(model, ids)
    adapter = adapter_for(method, **({"dropout": 0.0} if "dropout" in REGISTRY[method].options else {}))
    adapted = adapter.inject(model, names).eval()
    assert torch.equal(logits(adapted, ids), pruned)
    perturb_trainable(adapted)
    if method == "masked-full":
        adapter.after_optimizer_step(adapted)
    adapted.eval()
    unmerged = logits(adapted, ids)
    merged = adapter.merge(adapted)
    assert relative_error(logits(merged, ids), unmerged) < 1e-5
    for name in names:
        assert int(((before[name] == 0) & (merged.get_submodule(name).weight != 0)).sum()) == 0

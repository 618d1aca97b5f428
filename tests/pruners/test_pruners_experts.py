"""Mixture-of-experts (pruners/experts.py): tiny random-init Mixtral and Qwen3-MoE, fused 3-D experts."""

import numpy as np
import pytest
import torch
from tiny_models import random_model

from pruners import parse_pattern
from pruners.experts import ExpertLinear, weight_of
from pruners.sequential import PruneOptions, prunable_linears, prune_model

VOCAB = 128
ARCHITECTURES = ("mixtral", "qwen3_moe")


def moe_model(arch):
    model = random_model(arch, vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="eager")
    with torch.no_grad():  # different routers per block, and a clear preference so routing is uneven
        for block in model.model.layers:
            block.mlp.gate.weight.normal_(0, 0.5)
    return model


def calibration(nsamples=4, seqlen=16):
    return torch.randint(2, VOCAB, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))


def test_fused_experts_become_one_linear_per_projection_and_routers_are_left_alone():
    for arch in ARCHITECTURES:
        model = moe_model(arch)
        experts = model.model.layers[0].mlp.experts
        assert experts.gate_up_proj.dim() == 3  # transformers 5 fuses the experts: no nn.Linear per expert
        linears = prunable_linears(model)
        names = [n for n in linears if n.startswith("model.layers.0.mlp.")]
        assert names == [f"model.layers.0.mlp.experts.{e}.{p}" for e in range(4)
                         for p in ("gate_proj", "up_proj", "down_proj")], arch
        gate = linears["model.layers.0.mlp.experts.2.gate_proj"]
        assert isinstance(gate, ExpertLinear) and gate.weight.shape == (experts.gate_up_proj.shape[1] // 2, 64)
        assert gate.weight.data_ptr() == experts.gate_up_proj[2].data_ptr()  # a view: pruning writes through
        assert linears["model.layers.0.mlp.experts.2.up_proj"].weight.data_ptr() == \
            experts.gate_up_proj[2, gate.out_features:].data_ptr()
        assert not any(n.endswith("mlp.gate") for n in linears)
        routers = prunable_linears(model, targets=r"mlp\.gate$")
        assert list(routers) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def routed_tokens(model, ids):
    """Independently: the block-0 MoE input and, per expert, the tokens the router sends to it."""
    seen = {}
    mlp = model.model.layers[0].mlp
    hook = mlp.register_forward_pre_hook(lambda m, args: seen.setdefault("x", []).append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        for row in range(ids.shape[0]):
            model(ids[row:row + 1])
    hook.remove()
    x = torch.cat(seen["x"])
    with torch.no_grad():
        top = torch.topk(torch.softmax(x @ mlp.gate.weight.t(), dim=-1), 2, dim=-1).indices
    return x, {e: (top == e).any(dim=-1) for e in range(4)}


def wanda_mask_formula(weight, tokens, sparsity=0.5):
    norms = tokens.double().pow(2).sum(0).sqrt().numpy()
    metric = np.abs(weight.detach().double().numpy()) * norms
    count = int(weight.shape[1] * sparsity)
    mask = np.zeros(metric.shape, dtype=bool)
    for row in range(metric.shape[0]):
        mask[row, np.argsort(metric[row], kind="stable")[:count]] = True
    return mask


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_expert_is_pruned_with_the_tokens_routed_to_it(arch):
    ids = calibration()
    model, reference = moe_model(arch), moe_model(arch)
    x, routed = routed_tokens(reference, ids)
    options = PruneOptions("wanda", parse_pattern("unstructured", 0.5), min_expert_tokens=1)
    reports = {r.name: r for r in prune_model(model, ids, options)}
    counts = [int(routed[e].sum()) for e in range(4)]
    assert min(counts) >= 1 and max(counts) > min(counts), counts  # uneven routing: the test can tell experts apart
    experts = reference.model.layers[0].mlp.experts
    for e in range(4):
        half = experts.gate_up_proj.shape[1] // 2
        expected = wanda_mask_formula(experts.gate_up_proj[e, :half], x[routed[e]])
        got = (weight_of(model, f"model.layers.0.mlp.experts.{e}.gate_proj") == 0).numpy()
        assert np.array_equal(got, expected), (arch, e)
        assert reports[f"model.layers.0.mlp.experts.{e}.gate_proj"].tokens == counts[e]
        assert reports[f"model.layers.0.mlp.experts.{e}.down_proj"].tokens == counts[e]
    # a mask from all tokens would differ: the routing matters
    everyone = wanda_mask_formula(experts.gate_up_proj[0, :half], x)
    assert not np.array_equal((weight_of(model, "model.layers.0.mlp.experts.0.gate_proj") == 0).numpy(), everyone)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_moe_end_to_end_every_method_and_pattern(arch):
    ids = calibration()
    for method in ["magnitude", "wanda", "sparsegpt"]:
        for pattern in [parse_pattern("unstructured", 0.5), parse_pattern("2:4")]:
            model = moe_model(arch)
            routers = [block.mlp.gate.weight.detach().clone() for block in model.model.layers]
            reports = prune_model(model, ids, PruneOptions(method, pattern, min_expert_tokens=1))
            assert {r.name for r in reports} == set(prunable_linears(model))
            for name in prunable_linears(model):
                zeros = weight_of(model, name) == 0
                if pattern.is_nm:
                    assert (zeros.reshape(zeros.shape[0], -1, 4).sum(-1) == 2).all(), (arch, method, name)
                elif method == "wanda":
                    assert (zeros.sum(1) == zeros.shape[1] // 2).all(), (arch, name)
            assert all(torch.equal(block.mlp.gate.weight, before)
                       for block, before in zip(model.model.layers, routers, strict=True))
            with torch.no_grad():
                assert torch.isfinite(model(ids).logits).all()


def test_router_is_pruned_when_targeted_explicitly():
    model = moe_model("mixtral")
    reports = prune_model(model, calibration(),
                          PruneOptions("wanda", parse_pattern("unstructured", 0.5), targets=r"mlp\.gate$"))
    assert [r.name for r in reports] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert float((model.model.layers[0].mlp.gate.weight == 0).float().mean()) == 0.5
    assert float((model.model.layers[0].mlp.experts.gate_up_proj == 0).float().mean()) == 0.0


def test_expert_with_too_few_tokens_falls_back_to_magnitude():
    ids = calibration()
    model, magnitude = moe_model("mixtral"), moe_model("mixtral")
    _, routed = routed_tokens(moe_model("mixtral"), ids)
    counts = {e: int(routed[e].sum()) for e in range(4)}
    threshold = sorted(counts.values())[1] + 1  # the two least-used experts of block 0 fall back
    options = PruneOptions("sparsegpt", parse_pattern("unstructured", 0.5), min_expert_tokens=threshold)
    reports = {r.name: r for r in prune_model(model, ids, options)}
    prune_model(magnitude, None, PruneOptions("magnitude", parse_pattern("unstructured", 0.5)))
    fell_back = {e for e in range(4) if reports[f"model.layers.0.mlp.experts.{e}.gate_proj"].fallback}
    assert fell_back == {e for e, n in counts.items() if n < threshold} and len(fell_back) == 2
    for e in range(4):
        for projection in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.0.mlp.experts.{e}.{projection}"
            same = torch.equal(weight_of(model, name), weight_of(magnitude, name))
            assert same == (e in fell_back), name  # magnitude's exact weights, or SparseGPT's updated ones
            assert reports[name].tokens == counts[e]
    assert reports["model.layers.0.self_attn.q_proj"].fallback is None

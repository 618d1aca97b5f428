"""The block-by-block driver on tiny random-init HF models (fp32, CPU)."""

import copy
import math

import numpy as np
import pytest
import torch
import transformers
from tiny_models import tiny_config
from torch import nn

from benchmarks.reference import reference_fasterprune
from pruners import CholeskyError, PatternError, parse_pattern
from pruners.blocks import block_outputs, capture_block_inputs
from pruners.observer import LinearObserver
from pruners.sequential import (
    PruneOptions,
    PrunerOptionError,
    UnsupportedModelError,
    find_decoder_blocks,
    prunable_linears,
    prune_model,
)

VOCAB, SEQLEN, NSAMPLES = 128, 16, 4
SMALL = dict(vocab_size=VOCAB, max_position_embeddings=64, num_key_value_heads=2, attn_implementation="eager")
SLIDING_FULL_SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
ARCHITECTURES = {  # tiny_models.tiny_config with SMALL and each architecture's attention variant
    "llama": lambda: tiny_config("llama", **SMALL),
    "llama-sdpa": lambda: tiny_config("llama", **{**SMALL, "attn_implementation": "sdpa"}),
    "mistral": lambda: tiny_config("mistral", **SMALL, sliding_window=8),
    "qwen2": lambda: tiny_config("qwen2", **SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen3": lambda: tiny_config("qwen3", **SMALL),
    "gemma2": lambda: tiny_config("gemma2", **SMALL, num_hidden_layers=3, sliding_window=8),
    "gemma3": lambda: tiny_config("gemma3", **SMALL, num_hidden_layers=3, sliding_window=8,
                                  layer_types=SLIDING_FULL_SLIDING),
    "phi3": lambda: tiny_config("phi3", **SMALL),
    "opt": lambda: tiny_config("opt", **SMALL),
}
_BUILT = {}


def tiny_model(arch="llama", outliers=True):
    """A fresh copy of a tiny random-init model; a few embedding columns are scaled x50 (outlier features)."""
    if arch not in _BUILT:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(ARCHITECTURES[arch]())
        if outliers:
            with torch.no_grad():
                model.get_input_embeddings().weight[:, [3, 17, 40]] *= 50
        _BUILT[arch] = model.eval()
    return copy.deepcopy(_BUILT[arch])


def calibration(seed=0, nsamples=NSAMPLES):
    return torch.randint(2, VOCAB, (nsamples, SEQLEN), generator=torch.Generator().manual_seed(seed))


def untouched_parameters(model):
    """Every parameter that is not a prunable linear's weight: embeddings, lm_head, norms, biases."""
    pruned = {name + ".weight" for name in prunable_linears(model)}
    return {name: p.detach().clone() for name, p in model.named_parameters() if name not in pruned}


# ----------------------------------------------------------------------------------------------------------------
# finding blocks


def test_find_decoder_blocks_by_no_split_modules():
    assert find_decoder_blocks(tiny_model("llama"))[0] == "model.layers"
    assert find_decoder_blocks(tiny_model("opt"))[0] == "model.decoder.layers"
    names = list(prunable_linears(tiny_model("llama")))
    assert len(names) == 14 and names[0] == "model.layers.0.self_attn.q_proj"
    assert list(prunable_linears(tiny_model("llama"), targets=r"mlp", ignore=r"down")) == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]


def test_model_without_blocks_is_unsupported():
    class Plain(nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    with pytest.raises(UnsupportedModelError, match=r"no decoder blocks found: Plain has no ModuleList of Block"):
        prune_model(Plain(), None, PruneOptions("magnitude", parse_pattern("unstructured", 0.5)))
    with pytest.raises(UnsupportedModelError, match="no decoder blocks found"):
        find_decoder_blocks(nn.Sequential(nn.Linear(4, 4)))


# ----------------------------------------------------------------------------------------------------------------
# capture and replay


@pytest.mark.parametrize("arch", ["llama", "llama-sdpa", "mistral", "gemma2", "gemma3", "qwen2", "opt"])
def test_replayed_blocks_reproduce_the_model_forward(arch):
    """Captured block-0 inputs and per-block kwargs, replayed block by block, equal the model's hidden states.

    Gemma2 and Qwen2 here give sliding-window blocks (window 8 < seqlen 16) a different mask from full blocks.
    """
    model = tiny_model(arch)
    ids = calibration()
    _, blocks = find_decoder_blocks(model)
    batches = [slice(0, 3), slice(3, 4)]
    with torch.no_grad():
        captured = capture_block_inputs(model, blocks, ids, batches, torch.device("cpu"),
                                        lambda shape, dtype: torch.device("cpu"))
        expected = model.model(input_ids=ids, output_hidden_states=True).hidden_states if arch != "opt" else \
            model.model.decoder(input_ids=ids, output_hidden_states=True).hidden_states
        hidden = captured.hidden
        assert torch.allclose(hidden, expected[0], atol=1e-5)
        final_norm = model.model.decoder.final_layer_norm if arch == "opt" else model.model.norm
        for index in range(len(blocks)):
            out = torch.empty_like(hidden)
            for batch, block_out in block_outputs(blocks[index], hidden, captured.calls[index], batches,
                                                   torch.device("cpu")):
                out[batch] = block_out
            if index == len(blocks) - 1:  # the model's last hidden state has the final norm applied
                out = final_norm(out)
            assert torch.allclose(out, expected[index + 1], atol=1e-4, rtol=1e-4), index
            hidden = out
    assert all("cache" not in kwargs and "past_key_values" not in kwargs
               for calls in captured.calls for _, kwargs in calls)


def test_linear_groups_follow_call_order_and_shared_inputs():
    for arch, expected in [
        ("llama", [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
        ("opt", [["q_proj", "k_proj", "v_proj"], ["out_proj"], ["fc1"], ["fc2"]]),
        ("phi3", [["qkv_proj"], ["o_proj"], ["gate_up_proj"], ["down_proj"]]),
    ]:
        model = tiny_model(arch)
        prefix, blocks = find_decoder_blocks(model)
        linears = {name: module for name, module in prunable_linears(model).items()
                   if name.startswith(f"{prefix}.0.")}
        observer = LinearObserver(linears, lambda name: None, active=lambda group: False)
        with torch.no_grad():
            model(calibration()[:1])
        observer.remove()
        assert [[name.rsplit(".", 1)[1] for name in group] for group in observer.groups()] == expected, arch


# ----------------------------------------------------------------------------------------------------------------
# whole-model exactness against formulas


def magnitude_formula(weight, sparsity):
    absolute = weight.abs().numpy()
    return absolute <= np.sort(absolute.ravel())[int(absolute.size * sparsity)]


def wanda_formula(weight, inputs, sparsity):
    norms = inputs.reshape(-1, inputs.shape[-1]).double().pow(2).sum(0).sqrt().numpy()
    metric = np.abs(weight.double().numpy()) * norms
    count = int(weight.shape[1] * sparsity)
    mask = np.zeros(metric.shape, dtype=bool)
    for row in range(metric.shape[0]):
        mask[row, np.argsort(metric[row], kind="stable")[:count]] = True
    return mask


def sequentially_by_hand(model, ids, choose_mask):
    """Prune block by block: each linear's inputs come from a full forward of the model pruned so far."""
    prefix, blocks = find_decoder_blocks(model)
    linears = prunable_linears(model)
    for index in range(len(blocks)):
        mine = {name: lin for name, lin in linears.items() if name.startswith(f"{prefix}.{index}.")}
        seen = {}
        hooks = [lin.register_forward_hook(lambda m, args, out, name=name, seen=seen: seen.__setitem__(name, args[0]))
                 for name, lin in mine.items()]
        with torch.no_grad():
            model(ids)
        for hook in hooks:
            hook.remove()
        for name, lin in mine.items():
            with torch.no_grad():
                lin.weight.copy_(choose_mask(lin.weight.detach(), seen[name]))


def test_whole_model_magnitude_equals_per_matrix_formula():
    model, reference = tiny_model(), tiny_model()
    blocks_seen = []
    reports = prune_model(model, None, PruneOptions("magnitude", parse_pattern("unstructured", 0.6)),
                          on_block=blocks_seen.append)
    for name, lin in prunable_linears(reference).items():
        assert np.array_equal((prunable_linears(model)[name].weight == 0).numpy(),
                              magnitude_formula(lin.weight.detach(), 0.6)), name
    assert len(reports) == 14
    assert [b.index for b in blocks_seen] == [0, 1] and all(math.isnan(b.reconstruction_error) for b in blocks_seen)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_whole_model_wanda_equals_formula_on_pruned_prefix(batch_size):
    ids = calibration()
    model, reference = tiny_model(), tiny_model()
    blocks_seen = []
    reports = prune_model(model, ids, PruneOptions("wanda", parse_pattern("unstructured", 0.5), batch_size=batch_size),
                          on_block=blocks_seen.append)
    sequentially_by_hand(reference, ids, lambda w, x: w.masked_fill(torch.from_numpy(wanda_formula(w, x, 0.5)), 0))
    pruned, expected = prunable_linears(model), prunable_linears(reference)
    for name in expected:
        assert torch.equal(pruned[name].weight == 0, expected[name].weight == 0), name
        assert ((pruned[name].weight == 0).sum(1) == pruned[name].in_features // 2).all()
    assert [r.sparsity for r in reports] == [0.5] * 14
    assert [b.index for b in blocks_seen] == [0, 1] and all(0 < b.reconstruction_error < 1 for b in blocks_seen)
    # the outlier channels make wanda choose differently from magnitude
    magnitude = tiny_model()
    prune_model(magnitude, None, PruneOptions("magnitude", parse_pattern("unstructured", 0.5)))
    differing = sum(int((pruned[n].weight.eq(0) != prunable_linears(magnitude)[n].weight.eq(0)).sum())
                    for n in pruned)
    assert differing > 500


def test_whole_model_sparsegpt_equals_reference_on_pruned_prefix():
    ids = calibration(nsamples=8)
    model, reference = tiny_model(), tiny_model()
    reports = prune_model(model, ids, PruneOptions("sparsegpt", parse_pattern("unstructured", 0.5)))

    def solve(weight, inputs):
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        hessian = 2 / inputs.shape[0] * x.t() @ x
        return reference_fasterprune(weight, hessian, 0.5)[0]

    sequentially_by_hand(reference, ids, solve)
    for name, lin in prunable_linears(reference).items():
        mine = prunable_linears(model)[name].weight.detach()
        assert torch.equal(mine == 0, lin.weight == 0), name
        assert float((mine - lin.weight.detach()).abs().max()) <= 1e-4 * float(lin.weight.detach().abs().max()), name
    assert all(r.damping == 0.01 and r.error > 0 for r in reports)


@pytest.mark.parametrize("batch_size", [1, 5])
def test_statistics_passes_stop_early_and_change_nothing(batch_size):
    """More windows than ERROR_WINDOWS: the other windows' dense passes stop at down_proj's input and the last
    block's pruned pass runs the error windows only -- and the masks still equal the by-hand formulas."""
    from pruners.sequential import ERROR_WINDOWS

    nsamples = 12
    ids = calibration(nsamples=nsamples)
    model, reference = tiny_model(), tiny_model()
    prefix, blocks = find_decoder_blocks(model)
    down_runs = [0] * len(blocks)  # executions of each block's down_proj (a forward hook fires only after it ran)
    hooks = [block.mlp.down_proj.register_forward_hook(
        lambda module, args, out, index=index: down_runs.__setitem__(index, down_runs[index] + args[0].shape[0]))
        for index, block in enumerate(blocks)]
    blocks_seen = []
    prune_model(model, ids, PruneOptions("wanda", parse_pattern("unstructured", 0.5), batch_size=batch_size),
                on_block=blocks_seen.append)
    for hook in hooks:
        hook.remove()
    measured = 10 if batch_size == 5 else ERROR_WINDOWS  # whole batches: [0:5] and [5:10] start below 8
    alone = 1 if batch_size == 1 else 0  # one-window batches run chunked, checked against window 0 run alone
    assert down_runs == [alone + measured + nsamples, alone + measured + measured]  # dense (error) + pruned pass
    assert [b.error_windows for b in blocks_seen] == [measured, measured]
    sequentially_by_hand(reference, ids, lambda w, x: w.masked_fill(torch.from_numpy(wanda_formula(w, x, 0.5)), 0))
    for name, lin in prunable_linears(reference).items():
        assert torch.equal(prunable_linears(model)[name].weight == 0, lin.weight == 0), name


def test_a_chunked_forward_that_differs_falls_back_to_one_window_forwards():
    """Where a forward of several windows does not reproduce one-window forwards bit for bit (here a pre-hook
    perturbs multi-window inputs, as a backend choosing another kernel for more rows could), the block is redone
    one window at a time: the statistics, and so the masks, are still those of one-window forwards."""
    ids = calibration(nsamples=12)
    model, reference = tiny_model(), tiny_model()
    _, blocks = find_decoder_blocks(model)
    seen_windows = []

    def perturb_multiwindow(module, args, kwargs):
        seen_windows.append(args[0].shape[0])
        if args[0].shape[0] > 1:
            hidden = args[0].clone()
            hidden[..., :8] *= 3  # moves the per-channel input norms, so wanda would choose other weights
            return (hidden,) + args[1:], kwargs
        return None

    hooks = [block.register_forward_pre_hook(perturb_multiwindow, with_kwargs=True) for block in blocks]
    prune_model(model, ids, PruneOptions("wanda", parse_pattern("unstructured", 0.5)))
    for hook in hooks:
        hook.remove()
    assert max(seen_windows) == 8  # the chunked error forward was tried ...
    sequentially_by_hand(reference, ids, lambda w, x: w.masked_fill(torch.from_numpy(wanda_formula(w, x, 0.5)), 0))
    for name, lin in prunable_linears(reference).items():  # ... and dropped
        assert torch.equal(prunable_linears(model)[name].weight == 0, lin.weight == 0), name


def test_forward_chunks_group_only_equal_one_window_calls():
    from pruners.blocks import forward_chunks

    shared, other = ((), {"mask": torch.zeros(1)}), ((), {"mask": torch.ones(1)})
    ones = [slice(i, i + 1) for i in range(5)]
    assert forward_chunks([shared, shared, shared, other, other], ones, 2) == [(0, 2), (2, 3), (3, 5)]
    assert forward_chunks([shared] * 5, ones, 1) == [(i, i + 1) for i in range(5)]
    assert forward_chunks([shared] * 2, [slice(0, 2), slice(2, 4)], 8) == [(0, 1), (1, 2)]


def test_sparsegpt_with_more_windows_than_the_error_measures_equals_reference():
    """12 windows: the early-stopping statistics pass and the one factorisation per shared Hessian (q, k, v;
    gate, up) give the reference's masks and weights."""
    ids = calibration(nsamples=12)
    model, reference = tiny_model(), tiny_model()
    prune_model(model, ids, PruneOptions("sparsegpt", parse_pattern("unstructured", 0.5)))

    def solve(weight, inputs):
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        return reference_fasterprune(weight, 2 / inputs.shape[0] * x.t() @ x, 0.5)[0]

    sequentially_by_hand(reference, ids, solve)
    for name, lin in prunable_linears(reference).items():
        mine = prunable_linears(model)[name].weight.detach()
        assert torch.equal(mine == 0, lin.weight == 0), name
        assert float((mine - lin.weight.detach()).abs().max()) <= 1e-4 * float(lin.weight.detach().abs().max()), name


def test_true_sequential_changes_sparsegpt_weights():
    ids = calibration()
    default, true_sequential = tiny_model(), tiny_model()
    prune_model(default, ids, PruneOptions("sparsegpt", parse_pattern("unstructured", 0.5)))
    prune_model(true_sequential, ids,
                PruneOptions("sparsegpt", parse_pattern("unstructured", 0.5), true_sequential=True))
    a, b = prunable_linears(default), prunable_linears(true_sequential)
    assert torch.equal(a["model.layers.0.self_attn.q_proj"].weight, b["model.layers.0.self_attn.q_proj"].weight)
    down_default, down_true = (x["model.layers.0.mlp.down_proj"].weight.detach() for x in (a, b))
    assert float((down_default - down_true).abs().max()) > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# every architecture, every method, both pattern kinds


@pytest.mark.parametrize("arch", [arch for arch in ARCHITECTURES if arch != "llama-sdpa"])
def test_architectures_end_to_end(arch):
    ids = calibration()
    for method in ["magnitude", "wanda", "sparsegpt"]:
        for pattern in [parse_pattern("unstructured", 0.5), parse_pattern("2:4")]:
            model = tiny_model(arch)
            before = untouched_parameters(model)
            reports = prune_model(model, ids, PruneOptions(method, pattern))
            linears = prunable_linears(model)
            assert [r.name for r in reports] and {r.name for r in reports} == set(linears)
            for name, lin in linears.items():
                zeros = lin.weight.detach() == 0
                if pattern.is_nm:  # exactly 2 zeros in every group of 4 inputs
                    assert (zeros.reshape(lin.out_features, -1, 4).sum(-1) == 2).all(), (arch, method, name)
                elif method == "wanda":  # exactly int(c*s) per row
                    assert (zeros.sum(1) == lin.in_features // 2).all(), (arch, name)
                elif method == "magnitude":  # the `<=` rule: int(numel*s)+1 per matrix
                    assert int(zeros.sum()) == lin.weight.numel() // 2 + 1, (arch, name)
                else:  # the `<=` rule per 128-column block
                    for start in range(0, lin.in_features, 128):
                        block = zeros[:, start:start + 128]
                        assert int(block.sum()) == block.numel() // 2 + 1, (arch, name, start)
            after = dict(model.named_parameters())
            assert all(torch.equal(after[name], value) for name, value in before.items()), (arch, method)
            with torch.no_grad():
                assert torch.isfinite(model(ids).logits).all()


# ----------------------------------------------------------------------------------------------------------------
# options, errors, side effects


def test_bad_options_raise_before_any_change():
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pattern = parse_pattern("unstructured", 0.5)
    cases = [
        (dict(method="obs"), PrunerOptionError, "unknown pruning method 'obs'"),
        (dict(method="wanda", calibration_ids=None), PrunerOptionError, "wanda needs calibration data"),
        (dict(method="magnitude", use_variant=True), PrunerOptionError, "use_variant is a wanda option"),
        (dict(method="magnitude", true_sequential=True), PrunerOptionError, "true_sequential"),
        (dict(method="wanda", batch_size=0), PrunerOptionError, "batch_size"),
        (dict(method="wanda", targets="nothing-matches"), PrunerOptionError, "no linear layer"),
        (dict(method="wanda", targets="(["), PrunerOptionError, "not a valid regular expression"),
        (dict(method="wanda", pattern=parse_pattern("3:6")), PatternError, "not a multiple of M=6"),
        (dict(method="wanda", calibration_ids=torch.zeros(4)), PrunerOptionError, "calibration ids"),
    ]
    for options, error, message in cases:
        arguments = dict(calibration_ids=calibration(), pattern=pattern) | options
        with pytest.raises(error, match=message):
            prune_model(model, arguments.pop("calibration_ids"),
                        PruneOptions(arguments.pop("method"), arguments.pop("pattern"), **arguments))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_targets_and_ignore_limit_what_is_pruned():
    model = tiny_model()
    reports = prune_model(model, calibration(),
                          PruneOptions("wanda", parse_pattern("2:4"), targets=r"layers\.1\.", ignore="k_proj"))
    assert sorted(r.name for r in reports) == sorted(
        n for n in prunable_linears(model) if n.startswith("model.layers.1.") and "k_proj" not in n)
    assert float((model.model.layers[0].self_attn.q_proj.weight == 0).float().mean()) == 0.0
    assert float((model.model.layers[1].self_attn.k_proj.weight == 0).float().mean()) == 0.0


def test_pruned_model_stays_trainable_and_keeps_its_mode():
    model = tiny_model()
    model.train()
    prune_model(model, calibration(), PruneOptions("sparsegpt", parse_pattern("2:4")))
    assert model.training
    assert not model.model.layers[0].mlp.up_proj.weight.is_inference()
    model(calibration()).logits.sum().backward()  # weights were written under no_grad, not inference_mode
    assert model.lm_head.weight.grad is not None


def test_cholesky_failure_is_a_runtime_error():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))  # NaN activations downstream
        model.model.layers[0].mlp.gate_proj.weight.fill_(float("nan"))
    with pytest.raises(CholeskyError, match="down_proj"):
        prune_model(model, calibration(), PruneOptions("sparsegpt", parse_pattern("unstructured", 0.5)))

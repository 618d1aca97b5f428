"""DSnoT (pruners/dsnot.py): the reference's loop, exact counts, and a lower block error than the Wanda mask."""

import pytest
import torch
from tiny_models import random_model

from pruners import parse_pattern
from pruners.dsnot import DSnoTPruner, refine_nm, refine_unstructured, reorder_by_sign
from pruners.sequential import PruneOptions, PrunerOptionError, prunable_linears, prune_model
from pruners.wanda import wanda_score


def reference_unstructured(initial_metric, wanda_metric, dsnot_metric, var, sparsity, max_cycle_time=50,
                           update_threshold=0.1, pow_of_var_regrowing=1):
    """zyxxmu/DSnoT lib/prune.py prune_DSnoT, unstructured branch with --without_same_sign (the default), verbatim
    but for names; valid only while no row runs out of candidates."""
    weight_mask = torch.zeros_like(initial_metric) == 1
    _, sorted_initial_indice = torch.sort(initial_metric, dim=-1, stable=True)
    sparsity_num = int(initial_metric.shape[1] * sparsity)
    res_sparsity_num = sorted_initial_indice.shape[1] - sparsity_num
    initial_prune_indices, initial_res_indices = torch.split(sorted_initial_indice, [sparsity_num, res_sparsity_num],
                                                             dim=1)
    weight_mask.scatter_(1, initial_prune_indices, True)
    metric_for_regrowing = dsnot_metric.clone()
    wanda_metric = wanda_metric.clone()
    metric_for_regrowing.scatter_(1, initial_res_indices, 0)
    reconstruction_error = torch.sum(metric_for_regrowing, dim=1, keepdim=True)
    metric_for_regrowing /= torch.pow(var.reshape((1, -1)), pow_of_var_regrowing)
    _, regrowing_indices_block = torch.sort(metric_for_regrowing, dim=1, stable=True)
    wanda_metric.scatter_(1, initial_prune_indices, float("inf"))
    wanda_res_indices, _ = torch.split(torch.sort(wanda_metric, dim=1, stable=True)[1],
                                       [res_sparsity_num, sparsity_num], dim=1)
    reorder = reorder_by_sign(torch.gather(dsnot_metric, 1, wanda_res_indices))
    pruning_indices_block = torch.gather(wanda_res_indices, 1, reorder)
    rows = reconstruction_error.shape[0]
    regrow_list = torch.zeros((rows, 2), dtype=torch.long)
    regrow_list[:, 1] = regrowing_indices_block.shape[-1] - 1
    regrow_step = torch.ones((rows, 2), dtype=torch.long)
    regrow_step[:, 1] = -1
    prune_list = torch.zeros((rows, 2), dtype=torch.long)
    prune_list[:, 1] = pruning_indices_block.shape[-1] - 1
    prune_step = torch.ones((rows, 2), dtype=torch.long)
    prune_step[:, 1] = -1
    update_mask = torch.ones_like(reconstruction_error, dtype=torch.bool)
    cycle_time = 0
    while not (torch.all(~update_mask) or cycle_time >= max_cycle_time):
        cycle_time += 1
        side = (reconstruction_error > 0).int().to(torch.int64)
        position = torch.gather(regrow_list, 1, side)
        regrowing_indice = torch.gather(regrowing_indices_block, 1, position)
        regrowing_metric = dsnot_metric.gather(1, regrowing_indice)
        regrow_list.scatter_(1, side, position + regrow_step.gather(1, side))
        side = (reconstruction_error < 0).int().to(torch.int64)
        position = torch.gather(prune_list, 1, side)
        pruning_indice = torch.gather(pruning_indices_block, 1, position)
        pruning_metric = dsnot_metric.gather(1, pruning_indice)
        prune_list.scatter_(1, side, position + prune_step.gather(1, side))
        update_mask = update_mask & (abs(reconstruction_error) > update_threshold)
        weight_mask.scatter_(1, pruning_indice, update_mask)
        weight_mask.scatter_(1, regrowing_indice, ~update_mask)
        reconstruction_error += torch.where(update_mask, pruning_metric, torch.zeros_like(pruning_metric))
        reconstruction_error -= torch.where(update_mask, regrowing_metric, torch.zeros_like(regrowing_metric))
    return weight_mask


def statistics(rows=48, cols=512, seed=0, offset=0.4):
    """A weight and the DSnoT statistics of inputs with non-zero means (as LLM activations have)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    inputs = torch.randn(6, 32, cols, generator=generator) + offset * torch.randn(cols, generator=generator)
    pruner = DSnoTPruner(torch.nn.Linear(cols, rows), "layer")
    for sample in inputs:
        pruner.add_batch(sample)
    return weight, inputs.reshape(-1, cols), pruner


def test_reorder_by_sign_is_the_reference_example():
    values = torch.tensor([[1.0, -2.0, 3.0], [-2, 2.0, -4], [5.0, 6.0, -7], [-6, -7, -4]])
    reordered = torch.gather(values, 1, reorder_by_sign(values))
    assert torch.equal(reordered, torch.tensor([[-2.0, 3.0, 1.0], [-2.0, -4.0, 2.0], [-7.0, 6.0, 5.0],
                                                [-6.0, -7.0, -4.0]]))


def test_statistics_are_the_reference_formulas():
    _, tokens, pruner = statistics()
    assert torch.allclose(pruner.sum_row, tokens.sum(0) / 6, atol=1e-4)  # per-sequence sum, averaged
    batches = tokens.reshape(6, 32, -1)
    assert torch.allclose(pruner.variance, batches.var(dim=1, unbiased=False).mean(0), atol=1e-5)
    assert torch.allclose(pruner.scaler_row, tokens.square().sum(0) / 6, rtol=1e-5)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_unstructured_refinement_equals_the_reference_loop(sparsity):
    weight, _, pruner = statistics()
    wanda = wanda_score(weight, pruner.scaler_row)
    expected = weight * pruner.sum_row
    mine = refine_unstructured(wanda, wanda, expected, pruner.variance, sparsity)
    reference = reference_unstructured(wanda, wanda, expected, pruner.variance, sparsity)
    initial = refine_unstructured(wanda, wanda, expected, pruner.variance, sparsity, max_cycles=0)
    assert torch.equal(mine, reference)
    assert int((mine != initial).sum()) > 1000  # the loop really swapped (50 cycles x 48 rows at most x 2)
    assert (mine.sum(1) == int(512 * sparsity)).all()


def test_refinement_keeps_counts_in_narrow_rows():
    """16 columns: fewer candidates than 50 cycles (the reference walks past its lists here)."""
    weight, _, pruner = statistics(rows=64, cols=16, offset=2.0)
    wanda = wanda_score(weight, pruner.scaler_row)
    expected = weight * pruner.sum_row
    mask = refine_unstructured(wanda, wanda, expected, pruner.variance, 0.5)
    assert (mask.sum(1) == 8).all()
    nm = refine_nm(wanda, expected, pruner.variance, 2, 4)
    assert (nm.reshape(64, 4, 4).sum(-1) == 2).all()
    assert int((nm != refine_nm(wanda, expected, pruner.variance, 2, 4, max_cycles=0)).sum()) > 0


def test_narrow_rows_follow_the_reference_past_the_sign_boundary():
    """128 columns at 0.7 (38 kept), 30 cycles: as in the reference, a row whose kept weights of the sign that would
    cut |e| run out goes on pruning those of the other sign (highest Wanda score first), and its |e| grows: why
    DSnoT's 50 cycles, sized for LLaMA's 4096-wide rows, make the tiny model's attention worse (REPORT-dsnot.md)."""
    weight, _, pruner = statistics(cols=128)
    wanda = wanda_score(weight, pruner.scaler_row)
    expected = weight * pruner.sum_row
    mine = refine_unstructured(wanda, wanda, expected, pruner.variance, 0.7, max_cycles=30)
    assert torch.equal(mine, reference_unstructured(wanda, wanda, expected, pruner.variance, 0.7, max_cycle_time=30))
    initial = refine_unstructured(wanda, wanda, expected, pruner.variance, 0.7, max_cycles=0)
    error = lambda mask: (expected * mask).sum(1).abs()  # noqa: E731 - the per-row expected error |e|
    assert int((error(mine) > error(initial) + 1e-3).sum()) >= 5


def test_nm_refinement_lowers_the_expected_error_and_keeps_groups():
    weight, tokens, pruner = statistics()
    wanda = wanda_score(weight, pruner.scaler_row)
    expected = weight * pruner.sum_row
    initial = refine_nm(wanda, expected, pruner.variance, 2, 4, max_cycles=0)
    refined = refine_nm(wanda, expected, pruner.variance, 2, 4)
    assert (refined.reshape(48, -1, 4).sum(-1) == 2).all()
    assert int((refined != initial).sum()) > 100
    error = lambda mask: (expected * mask).sum(1).abs()  # noqa: E731 - the per-row expected error |e|
    # a swap keeps e's sign but may grow it (the pruned partner is the group's lowest score, whatever its sign)
    assert float(error(refined).mean()) < 0.5 * float(error(initial).mean()), (error(refined).mean(),
                                                                              error(initial).mean())


# ----------------------------------------------------------------------------------------------------------------
# whole model


def llama(hidden=256, seed=0):
    """A random-init LLaMA whose hidden states have non-zero feature means (an embedding offset), like trained LMs."""
    model = random_model("llama", seed, vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_key_value_heads=2, max_position_embeddings=128, attn_implementation="eager")
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.05 * torch.randn(hidden))
    return model


def calibration():
    return torch.randint(2, 128, (16, 64), generator=torch.Generator().manual_seed(0))


def pruned(method, pattern, refine):
    model, blocks = llama(), []
    options = PruneOptions(method, parse_pattern(pattern, 0.5 if pattern == "unstructured" else None), refine=refine)
    prune_model(model, calibration(), options, on_block=blocks.append)
    return {name: lin.weight.detach() for name, lin in prunable_linears(model).items()}, blocks


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_dsnot_lowers_every_block_error_and_keeps_the_sparsity(pattern):
    plain, plain_blocks = pruned("wanda", pattern, "none")
    refined, refined_blocks = pruned("wanda", pattern, "dsnot")
    for before, after in zip(plain_blocks, refined_blocks, strict=True):
        assert after.reconstruction_error <= before.reconstruction_error, (before, after)
    assert refined_blocks[0].reconstruction_error < 0.7 * plain_blocks[0].reconstruction_error
    changed = 0
    for name, weight in refined.items():
        zeros, plain_zeros = weight == 0, plain[name] == 0
        assert torch.equal(zeros.sum(1), plain_zeros.sum(1)), name  # the same count in every row
        if pattern == "2:4":
            assert (zeros.reshape(weight.shape[0], -1, 4).sum(-1) == 2).all(), name
        if name.startswith("model.layers.0.mlp."):  # the reference's default --skip_layer mlp (later blocks see
            # other inputs)
            assert torch.equal(zeros, plain_zeros), name
        changed += int((zeros != plain_zeros).sum())
        kept = ~zeros  # DSnoT changes which weights are zero, never a kept value
        assert torch.equal(weight[kept], llama_weight(name)[kept]), name
    assert changed > 1000


_DENSE = {}


def llama_weight(name):
    if not _DENSE:
        _DENSE.update({n: lin.weight.detach().clone() for n, lin in prunable_linears(llama()).items()})
    return _DENSE[name]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_dsnot_keeps_counts_and_updates_kept_weights(pattern):
    refined, blocks = pruned("sparsegpt", pattern, "dsnot")
    for name, weight in refined.items():
        zeros = weight == 0
        if pattern == "2:4":
            assert (zeros.reshape(weight.shape[0], -1, 4).sum(-1) == 2).all(), name
        else:  # DSnoT's per-row count, not SparseGPT's per-block threshold
            assert (zeros.sum(1) == weight.shape[1] // 2).all(), name
    name = "model.layers.0.self_attn.q_proj"
    kept = refined[name] != 0
    assert float((refined[name][kept] - llama_weight(name)[kept]).abs().max()) > 1e-3  # the OBS update ran
    assert all(0 < b.reconstruction_error < 1 for b in blocks)


def test_bad_refine_options():
    model = llama(hidden=64)
    for options, message in [
        (dict(method="magnitude", refine="dsnot"), "magnitude is neither"),
        (dict(method="wanda", refine="dsnot", use_variant=True), "drop use_variant"),
        (dict(method="wanda", refine="owl"), "unknown refine 'owl'"),
    ]:
        with pytest.raises(PrunerOptionError, match=message):
            prune_model(model, calibration(),
                        PruneOptions(options.pop("method"), parse_pattern("unstructured", 0.5), **options))

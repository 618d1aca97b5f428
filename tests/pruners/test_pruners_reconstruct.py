"""Block-wise reconstruction (pruners/reconstruct.py, `refine="reconstruct"`): every block's output error falls, the
zeros are the masks the method chose (N:M too), only the kept weights of the target linears change, and a run is a
function of its seed."""

import pytest
import torch
from tiny_models import random_model

import pruners.reconstruct as reconstruct
import pruners.reconstruct_params as reconstruct_params
from pruners import parse_pattern
from pruners.errors import PrunerOptionError
from pruners.reconstruct import ReconstructSettings, linear_warmup_decay
from pruners.sequential import PruneOptions, prunable_linears, prune_model

NSAMPLES, SEQLEN = 8, 32
FAST = dict(reconstruct_epochs=2, reconstruct_batch_size=4, reconstruct_lr=1e-3)


def calibration():
    return torch.randint(4, 320, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(0))


def model():
    return random_model("llama", seed=0, dtype=torch.float32, initializer_range=0.1)


def run(method="wanda", pattern="unstructured", refine="reconstruct", spy=None, **options):
    """(model, BlockReports, masks chosen before training: linear name -> bool zeros) of one prune."""
    pruned, blocks, chosen = model(), [], {}
    if spy is not None:
        spy(chosen)
    sparsity = None if ":" in pattern else 0.5
    prune_model(pruned, calibration(), PruneOptions(method, parse_pattern(pattern, sparsity), refine=refine,
                                                    **({**FAST, **options} if "reconstruct" in refine else options)),
                on_block=blocks.append)
    return pruned, blocks, chosen


@pytest.fixture
def spy(monkeypatch):
    """Record each block's zeros as its masks are final, just before training."""

    def install(chosen):
        train = reconstruct.train_block

        def recording(block, settings):
            chosen.update({name: linear.weight == 0 for name, linear in block.linears.items()})
            train(block, settings)

        monkeypatch.setattr(reconstruct, "train_block", recording)

    return install


CASES = [("magnitude", "unstructured", "reconstruct"), ("wanda", "unstructured", "reconstruct"),
         ("sparsegpt", "unstructured", "reconstruct"), ("wanda", "2:4", "reconstruct"),
         ("sparsegpt", "2:4", "reconstruct"), ("wanda", "unstructured", "dsnot+reconstruct"),
         ("sparsegpt", "2:4", "dsnot+reconstruct")]


ADAPTER_CASES = [(*case, params) for params in ("spp", "masked-lora")
                 for case in (("wanda", "unstructured", "reconstruct"), ("sparsegpt", "2:4", "dsnot+reconstruct"))]


@pytest.mark.parametrize("method, pattern, refine, params", [(*case, "weights") for case in CASES] + ADAPTER_CASES,
                         ids=["-".join(case) for case in CASES] + ["-".join(case) for case in ADAPTER_CASES])
def test_every_block_error_falls_and_the_zeros_are_the_chosen_masks(spy, method, pattern, refine, params):
    pruned, blocks, chosen = run(method, pattern, refine, spy, reconstruct_params=params)
    assert len(blocks) == 2
    for report in blocks:  # the same windows, the same measure, before and after training
        assert report.reconstruction_error < report.error_before_reconstruct, report
    linears = prunable_linears(pruned)
    assert set(chosen) == set(linears)
    for name, linear in linears.items():
        assert type(linear) is torch.nn.Linear and torch.equal(linear.weight == 0, chosen[name]), name
    plain, plain_blocks, _ = run(method, pattern, refine.replace("reconstruct", "").rstrip("+") or "none")
    assert plain_blocks[0].error_before_reconstruct is None
    if method != "magnitude":  # (magnitude alone runs no data through the blocks: no error to compare)
        # block 0 sees the same inputs in both runs: the unrefined run's error is the one before training
        assert blocks[0].error_before_reconstruct == pytest.approx(plain_blocks[0].reconstruction_error, rel=1e-5)
    for name, linear in prunable_linears(plain).items():
        if method == "magnitude" or ".layers.0." in name:
            assert torch.equal(linear.weight == 0, chosen[name]), name


@pytest.mark.parametrize("params", ["weights", "masked-lora"])
def test_only_the_kept_weights_of_the_target_linears_change(params):
    dense = model()
    pruned, _, _ = run("magnitude", targets=r"mlp", reconstruct_params=params)
    plain, _, _ = run("magnitude", refine="none", targets=r"mlp")
    trained = prunable_linears(pruned, targets="mlp")
    for (name, after), before in zip(pruned.named_parameters(), plain.parameters(), strict=True):
        module = name.rsplit(".", 1)[0]
        if module in trained:
            assert not torch.equal(after, before), name
        else:  # norms, attention, embeddings, lm_head: as pruning (here: the dense model) left them
            assert torch.equal(after, before) and torch.equal(after, dense.get_parameter(name)), name


def test_same_seed_same_weights_other_seed_other_weights():
    first, second, other = (run("wanda", seed=seed)[0] for seed in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters(), strict=True))


@pytest.mark.parametrize("params", ["weights", "spp", "masked-lora"])
def test_bfloat16_keeps_every_zero_and_adds_none(params):
    dense = random_model("llama", seed=0, dtype=torch.bfloat16, initializer_range=0.1)
    plain = random_model("llama", seed=0, dtype=torch.bfloat16, initializer_range=0.1)
    prune_model(dense, calibration(), PruneOptions("magnitude", parse_pattern("2:4", None), refine="reconstruct",
                                                   reconstruct_params=params, **FAST))
    prune_model(plain, calibration(), PruneOptions("magnitude", parse_pattern("2:4", None)))
    for name, linear in prunable_linears(dense).items():
        assert torch.equal(linear.weight == 0, plain.get_submodule(name).weight == 0), name


def test_the_schedule_is_ebfts_linear_warmup_then_decay():
    factor = linear_warmup_decay(2, 10)
    assert [factor(k) for k in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert linear_warmup_decay(0, 4)(0) == 1.0  # EBFT's default: no warmup, the first step at the peak lr


@pytest.mark.parametrize("options, message", [
    (dict(refine="reconstruct", reconstruct_epochs=0), "reconstruct_epochs 0"),
    (dict(refine="reconstruct", reconstruct_lr=0.0), "reconstruct_lr 0.0"),
    (dict(refine="reconstruct", reconstruct_params="lora"), "unknown reconstruct_params 'lora'"),
    (dict(reconstruct_params="spp"), "reconstruct_params applies to refine reconstruct"),
    (dict(refine="dsnot+reconstruct"), "refine dsnot refines a wanda or sparsegpt mask"),
    (dict(refine="reconstruct+dsnot"), "unknown refine"),
    (dict(reconstruct_epochs=3), "applies to refine reconstruct"),
])
def test_the_driver_refuses_what_the_schema_refuses(options, message):
    with pytest.raises(PrunerOptionError, match=message):
        PruneOptions("magnitude", parse_pattern("unstructured", 0.5), **options).check()


def test_the_schema_defaults_are_ebfts():
    from spp_cli.recipe.schema import PruneStage

    defaults = ReconstructSettings()
    stage = PruneStage(method="wanda")
    assert (stage.reconstruct_epochs, stage.reconstruct_lr, stage.reconstruct_batch_size,
            stage.reconstruct_weight_decay, stage.reconstruct_warmup_steps) == (
        defaults.epochs, defaults.lr, defaults.batch_size, defaults.weight_decay, defaults.warmup_steps) == (
        10, 2e-4, 8, 0.1, 0)


def test_fused_moe_experts_are_refused_before_any_weight_changes():
    moe = random_model("mixtral", seed=0, dtype=torch.float32)
    before = [parameter.clone() for parameter in moe.parameters()]
    with pytest.raises(PrunerOptionError, match="fused MoE expert projection"):
        prune_model(moe, calibration(), PruneOptions("wanda", parse_pattern("unstructured", 0.5),
                                                     refine="reconstruct"))
    assert all(torch.equal(a, b) for a, b in zip(moe.parameters(), before, strict=True))


@pytest.mark.parametrize("params", ["spp", "masked-lora"])
def test_an_adapters_merge_is_the_finetune_adapters_merge_bit_for_bit(params):
    """pruners/reconstruct_params.py writes the adapters' merge formulas again (pruners/ imports no spp_cli):
    the same tensors give the same bytes as spp_cli/adapters' merged_weight, in float32 and bfloat16."""
    from spp_cli.adapters import masked_lora, spp

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(40, 48, generator=generator).mul_(torch.rand(40, 48, generator=generator) > 0.5)
        weight = weight.to(dtype)
        if params == "spp":
            adapter = reconstruct_params.SPPUpdate(weight, generator)
            torch.nn.init.normal_(adapter.beta, generator=generator)
            expected = spp.merged_weight(weight, adapter.alpha, adapter.beta, 16 / 8)
            assert adapter.alpha.shape == (8, 48)  # G: 16 does not divide 40 rows, 8 does
        else:
            adapter = reconstruct_params.MaskedLoRAUpdate(weight, generator)
            torch.nn.init.normal_(adapter.lora_B, generator=generator)
            expected = masked_lora.merged_weight(weight, adapter.lora_A, adapter.lora_B, 16 / 8)
        merged = adapter(weight)
        assert merged.dtype == dtype and torch.equal(merged, expected) and torch.equal(merged == 0, weight == 0)

"""Prune -> finetune -> merge -> verify on random-init tiny Mixtral and Qwen3-MoE (fused 3-D experts, transformers 5).

The experts are slices of fused parameters (pruners/experts.py), stored on disk unfused under other names (Mixtral:
`block_sparse_moe.experts.E.w1/w2/w3`): verify must read each of them, finetune adapts the nn.Linear targets,
SPP and masked-full adapt the experts too (the others leave them frozen and say so), and every zero survives.
"""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_models import ALPACA, random_model, save_random_model

from pruners.experts import weight_of
from spp_cli.adapters import adapter_class
from spp_cli.adapters.spp import SPPConfig, merged_weight
from spp_cli.adapters.spp_experts import inject_spp_experts, merge_spp_experts, spp_expert_parametrizations
from spp_cli.errors import BadInput
from spp_cli.io.stored_weights import StoredWeights
from spp_cli.stages.finetune import finetune
from spp_cli.stages.merge import merge_adapter
from spp_cli.stages.prune import prune
from spp_cli.stages.verify import verify_checkpoint

ARCHITECTURES = ("mixtral", "qwen3_moe")
# where save_pretrained puts block 1's expert 2 up projection (transformers 5.24 reverts its fusion on save)
UP_2_ON_DISK = {"mixtral": "model.layers.1.block_sparse_moe.experts.2.w3.weight",
                "qwen3_moe": "model.layers.1.mlp.experts.2.up_proj.weight"}
UP_2 = "model.layers.1.mlp.experts.2.up_proj"
TRAIN = dict(data=str(ALPACA), max_steps=3, batch_size=4, micro_batch_size=4, seqlen=32, val_size=0, device="cpu")
ATTENTION, EXPERT_SLICES = 2 * 4, 2 * 4 * 3  # linears per model: q, k, v, o per block; 4 experts x 3 per block


@pytest.fixture(scope="module", params=ARCHITECTURES)
def pruned(request, tmp_path_factory):
    """(architecture, dense dir, pruned dir): Wanda 50% with routed calibration, every expert with its tokens."""
    root = tmp_path_factory.mktemp(request.param)
    model = random_model(request.param, num_key_value_heads=2, tie_word_embeddings=False)
    with torch.no_grad():  # a clear router preference: uneven routing, as in tests/pruners/test_pruners_experts.py
        for block in model.model.layers:
            block.mlp.gate.weight.normal_(0, 0.5)
    save_random_model(root / "dense", model=model)
    text = "def f(x): return x * 2 # a comment about the code " * 60
    (root / "calib.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(8)))
    prune(str(root / "dense"), root / "pruned", method="wanda", sparsity=0.5, calib=str(root / "calib.jsonl"),
          nsamples=4, seqlen=64, min_expert_tokens=1, device="cpu")
    return request.param, root / "dense", root / "pruned"


def load(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def logits(model):
    ids = torch.randint(2, 320, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).logits


def routers(model):
    return [block.mlp.gate.weight.detach().clone() for block in model.model.layers]


def test_verify_reads_every_expert_slice_and_catches_a_lost_expert_zero(pruned, tmp_path):
    arch, dense, pruned_dir = pruned
    manifest = json.loads((pruned_dir / "spp.json").read_text())
    assert len(manifest["layers"]) == ATTENTION + EXPERT_SLICES
    report = verify_checkpoint(pruned_dir, against=dense)
    assert report["ok"] and report["layers_checked"] == ATTENTION + EXPERT_SLICES and report["lost_zeros"] == 0
    model, stored = load(pruned_dir), StoredWeights(pruned_dir)
    for name in [*manifest["layers"], "model.layers.0.mlp.gate"]:  # a router is read through the renaming too
        assert torch.equal(stored[name], weight_of(model, name)), name
    # one zero of one expert revived on disk, under the key transformers writes it as
    broken = tmp_path / "broken"
    shutil.copytree(pruned_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    zero = (tensors[UP_2_ON_DISK[arch]] == 0).flatten().nonzero()[0].item()
    tensors[UP_2_ON_DISK[arch]].view(-1)[zero] = 1.0
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    report = verify_checkpoint(broken, against=pruned_dir)
    assert not report["ok"] and report["lost_zeros"] == 1 and report["layers"][UP_2]["lost_zeros"] == 1
    assert report["problems"] == [f"{UP_2}: 1 zeros of the parent are nonzero"]


def test_verify_reads_experts_stored_fused(pruned, tmp_path):
    _, _, pruned_dir = pruned
    model = load(pruned_dir)
    fused = tmp_path / "fused"  # the in-memory layout as is: experts.gate_up_proj (E, 2I, H), experts.down_proj
    shutil.copytree(pruned_dir, fused, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fused / "model.safetensors",
              metadata={"format": "pt"})
    assert "model.layers.1.mlp.experts.gate_up_proj" in load_file(fused / "model.safetensors")
    stored = StoredWeights(fused)
    manifest = json.loads((pruned_dir / "spp.json").read_text())
    assert all(torch.equal(stored[name], weight_of(model, name)) for name in manifest["layers"])
    assert verify_checkpoint(fused, against=pruned_dir)["ok"]


def test_spp_adapts_attention_and_every_expert_and_merge_equals_the_adapted_model(pruned, tmp_path):
    _, _, pruned_dir = pruned
    trained = finetune(str(pruned_dir), tmp_path / "spp", method="spp", no_merge=True, lr=0.05, **TRAIN)
    assert "frozen_experts" not in trained and "warnings" not in trained
    adapter_dir = tmp_path / "spp" / "adapter"
    pruned_layers = json.loads((pruned_dir / "spp.json").read_text())["layers"]
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == sorted(pruned_layers)
    assert adapter_config["experts_forward"] == "fused, no branch dropout"
    merged = merge_adapter(adapter_dir, tmp_path / "merged")
    assert set(merged["layers"]) == set(pruned_layers) and "frozen_experts" not in merged
    report = verify_checkpoint(tmp_path / "merged", against=pruned_dir)
    assert report["ok"] and report["layers_checked"] == ATTENTION + EXPERT_SLICES and report["lost_zeros"] == 0

    parent, result = load(pruned_dir), load(tmp_path / "merged")
    for name in pruned_layers:
        before, after = weight_of(parent, name), weight_of(result, name)
        assert torch.equal(before == 0, after == 0), name  # the exact zero set, no extra zero either
        assert not torch.equal(before, after), name  # SPP's update reached every linear and every expert
    assert all(torch.equal(a, b) for a, b in zip(routers(parent), routers(result), strict=True))

    adapted = load(pruned_dir)
    adapter_class("spp").load(adapted, adapter_dir)
    adapted.eval()
    unmerged, merged_logits = logits(adapted), logits(result)
    assert (unmerged - logits(parent)).abs().max() > 1e-3  # the adapter does something the comparison can see
    assert (unmerged - merged_logits).abs().max() <= 1e-5


def test_spp_on_fused_experts_is_spp_on_each_expert_linear(pruned):
    _, _, pruned_dir = pruned
    model = load(pruned_dir)
    names = json.loads((pruned_dir / "spp.json").read_text())["layers"]
    before = {name: weight_of(model, name).clone() for name in names if ".experts." in name}
    config = SPPConfig(groups=4, dropout=0.0)
    inject_spp_experts(model, list(before), config.groups, config.scale)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parametrization in spp_expert_parametrizations(model).values():
            parametrization.spp_beta.copy_(torch.randn(parametrization.spp_beta.shape, generator=generator))
    experts = model.model.layers[1].mlp.experts
    spp = experts.parametrizations.gate_up_proj[0]
    rows = before["model.layers.1.mlp.experts.2.gate_proj"].shape[0]
    for projection, part in (("gate_proj", slice(0, 4)), ("up_proj", slice(4, 8))):  # own G = 4 groups each
        beta = spp.spp_beta[2, :rows] if projection == "gate_proj" else spp.spp_beta[2, rows:]
        expected = merged_weight(before[f"model.layers.1.mlp.experts.2.{projection}"], spp.spp_alpha[2, part], beta,
                                 config.scale)
        block = slice(0, rows) if projection == "gate_proj" else slice(rows, 2 * rows)
        assert torch.allclose(experts.gate_up_proj[2, block], expected, rtol=0, atol=1e-6), projection
    down = experts.parametrizations.down_proj[0]
    expected = merged_weight(before["model.layers.1.mlp.experts.2.down_proj"], down.spp_alpha[2], down.spp_beta[2],
                             config.scale)
    assert torch.allclose(experts.down_proj[2], expected, rtol=0, atol=1e-6)
    # the frozen weight is still what the layers read; the merge writes W' and the plain parameter comes back
    assert torch.equal(weight_of(model, "model.layers.1.mlp.experts.2.down_proj"),
                       before["model.layers.1.mlp.experts.2.down_proj"])
    merge_spp_experts(model)
    assert isinstance(experts.down_proj, torch.nn.Parameter) and torch.allclose(experts.down_proj[2], expected,
                                                                                  rtol=0, atol=1e-6)
    assert set(model.state_dict()) == set(load(pruned_dir).state_dict())


def test_masked_full_trains_the_fused_experts_under_their_mask(pruned, tmp_path):
    _, _, pruned_dir = pruned
    trained = finetune(str(pruned_dir), tmp_path / "full", method="masked-full", lr=1e-2, **TRAIN)
    assert "frozen_experts" not in trained and "warnings" not in trained
    hidden, intermediate = 64, trained["layers"]["model.layers.0.mlp.experts.0.down_proj"]["shape"][1]
    attention = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64)
    assert trained["training"]["trainable_params"] == attention + 2 * 4 * 3 * hidden * intermediate
    assert verify_checkpoint(tmp_path / "full", against=pruned_dir)["ok"]
    parent, result = load(pruned_dir), load(tmp_path / "full")
    for name in trained["layers"]:
        before, after = weight_of(parent, name), weight_of(result, name)
        assert torch.equal(before == 0, after == 0), name
        assert not torch.equal(before, after), name  # trained: experts too
    assert all(torch.equal(a, b) for a, b in zip(routers(parent), routers(result), strict=True))
    adapted = load(pruned_dir)  # the adapter's state on its base is the merged model
    adapter_class("masked-full").load(adapted, tmp_path / "full" / "adapter")
    assert (logits(adapted) - logits(result)).abs().max() <= 1e-5


@pytest.mark.parametrize("pruned", ["mixtral"], indirect=True)  # one architecture is enough here
@pytest.mark.parametrize("method", ["masked-lora", "ia3", "lora"])
def test_methods_without_a_fused_form_leave_the_experts_frozen_and_say_so(method, pruned, tmp_path):
    _, _, pruned_dir = pruned
    trained = finetune(str(pruned_dir), tmp_path / method, method=method, **TRAIN)
    assert trained["frozen_experts"] == EXPERT_SLICES and len(trained["layers"]) == ATTENTION + EXPERT_SLICES
    assert trained["warnings"] == [f"experts: {EXPERT_SLICES} fused expert projections are not adapted (--method "
                                   f"{method} has no form for fused experts; spp and masked-full have); they stay "
                                   "frozen and keep their zeros"]
    adapter_config = json.loads((tmp_path / method / "adapter" / "adapter_config.json").read_text())
    assert len(adapter_config["target_modules"]) == ATTENTION
    report = verify_checkpoint(tmp_path / method, against=pruned_dir)
    expert_lost = sum(entry["lost_zeros"] for name, entry in report["layers"].items() if ".experts." in name)
    assert expert_lost == 0 and report["ok"] == (method != "lora")  # LoRA: dense attention, experts untouched
    parent, result = load(pruned_dir), load(tmp_path / method)
    assert all(torch.equal(weight_of(parent, n), weight_of(result, n)) for n in trained["layers"] if ".experts." in n)


@pytest.mark.parametrize("pruned", ["mixtral"], indirect=True)
def test_partly_pruned_experts_stay_frozen_and_experts_alone_need_a_fused_method(pruned, tmp_path):
    _, dense, _ = pruned
    calib = dict(calib=str(dense.parent / "calib.jsonl"), nsamples=4, seqlen=64, min_expert_tokens=1, device="cpu")
    partly = prune(str(dense), tmp_path / "partly", method="wanda", sparsity=0.5, ignore=r"experts\.3\.", **calib)
    assert len(partly["layers"]) == ATTENTION + EXPERT_SLICES - 2 * 3
    trained = finetune(str(tmp_path / "partly"), tmp_path / "spp", method="spp", **TRAIN)
    # a fused parameter trains whole, so experts 0-2 of a parameter whose expert 3 is dense are not adapted
    assert trained["frozen_experts"] == EXPERT_SLICES - 2 * 3
    parent, result = load(tmp_path / "partly"), load(tmp_path / "spp")
    for block in range(2):
        for parameter in ("gate_up_proj", "down_proj"):
            before = getattr(parent.model.layers[block].mlp.experts, parameter)
            assert torch.equal(before, getattr(result.model.layers[block].mlp.experts, parameter))
    experts_only = prune(str(dense), tmp_path / "experts", method="wanda", sparsity=0.5, targets=r"experts", **calib)
    assert all(".experts." in name for name in experts_only["layers"])
    with pytest.raises(BadInput, match="every pruned layer is a fused MoE expert, which --method masked-lora does "
                                       "not adapt: use --method spp or masked-full, or prune other linears too"):
        finetune(str(tmp_path / "experts"), tmp_path / "masked-lora", method="masked-lora", **TRAIN)
    assert not (tmp_path / "masked-lora").exists()


@pytest.mark.parametrize("pruned", ["mixtral"], indirect=True)
def test_an_interrupted_moe_finetune_resumes_to_the_uninterrupted_adapter(pruned, tmp_path, monkeypatch):
    """The experts' α/β live in parametrizations (other names than SPPLinear's): they must resume exactly too."""
    from transformers import TrainerCallback

    import spp_cli.stages.finetune as stage

    _, _, pruned_dir = pruned
    options = dict(TRAIN, max_steps=4, save_steps=2, method="spp", lr=0.05)
    reference = finetune(str(pruned_dir), tmp_path / "reference", **options)

    class InterruptAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(stage, "_progress_callbacks", lambda console, options: [InterruptAtStep3()])
        with pytest.raises(KeyboardInterrupt):
            finetune(str(pruned_dir), tmp_path / "tuned", **options)
    resumed = finetune(str(pruned_dir), tmp_path / "tuned", **options)
    assert resumed["run"]["resumed_from"] == "checkpoint-2"
    assert resumed["manifest_sha256"] == reference["manifest_sha256"]
    want, got = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (tmp_path / "reference",
                                                                                  tmp_path / "tuned"))
    assert want.keys() == got.keys() and "model.layers.1.mlp.experts.gate_up_proj.spp_alpha" in want
    assert all(torch.equal(want[key], got[key]) for key in want)

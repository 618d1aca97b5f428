"""`spp verify`: a broken N:M group and a revived zero are caught (exit 1); extra zeros are only counted."""

import json

import torch
from conftest import run_spp
from safetensors.torch import load_file, save_file
from tiny_models import random_model, tiny_tokenizer

from spp_cli.io import checkpoint
from spp_cli.io.manifest import layers_record


def save_two_four(directory):
    """A 2:4 magnitude-pruned tiny LLaMA with its spp.json; returns the layer names."""
    model = random_model()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            weight = modules[name].weight
            groups = weight.abs().reshape(weight.shape[0], -1, 4)
            drop = groups.topk(2, dim=-1, largest=False).indices
            mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True).reshape(weight.shape)
            weight[mask] = 0
    manifest = {"stage": "prune", "pattern": "2:4", "layers": layers_record(model, names), "dense": False}
    checkpoint.save_checkpoint(model, tiny_tokenizer(), directory, manifest)
    return names


def edit_weight(directory, name, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors[f"{name}.weight"])
    save_file(tensors, path, metadata={"format": "pt"})


def test_verify_passes_a_clean_checkpoint(tmp_path, capsys):
    names = save_two_four(tmp_path / "pruned")
    code, out, _ = run_spp(["verify", tmp_path / "pruned", "--format", "json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["layers_checked"] == len(names) and report["broken_groups"] == 0


def test_verify_catches_a_broken_group(tmp_path, capsys):
    names = save_two_four(tmp_path / "pruned")

    def revive_group(weight):
        group = weight[0, :4]
        group[group == 0] = 0.5  # row 0, group 0 now has no zeros

    edit_weight(tmp_path / "pruned", names[0], revive_group)
    code, out, _ = run_spp(["verify", tmp_path / "pruned"], capsys)
    assert code == 1
    assert f"{names[0]}: 1 groups break 2:4" in out


def test_verify_against_parent_separates_lost_and_extra_zeros(tmp_path, capsys):
    names = save_two_four(tmp_path / "parent")
    child = tmp_path / "child"
    (child).mkdir()
    for item in (tmp_path / "parent").iterdir():
        (child / item.name).write_bytes(item.read_bytes())

    def add_zeros(weight):
        weight[weight != 0][:0] = 0
        nonzero = (weight != 0).nonzero()[:3]
        weight[nonzero[:, 0], nonzero[:, 1]] = 0

    edit_weight(child, names[1], add_zeros)
    code, out, _ = run_spp(["verify", child, "--against", tmp_path / "parent", "--format", "json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["extra_zeros"] == 3 and report["lost_zeros"] == 0

    def revive_zero(weight):
        zero = (weight == 0).nonzero()[0]
        weight[zero[0], zero[1]] = 0.25

    edit_weight(child, names[2], revive_zero)
    code, out, _ = run_spp(["verify", child, "--against", tmp_path / "parent", "--format", "json"], capsys)
    report = json.loads(out)
    assert code == 1 and report["lost_zeros"] == 1
    assert any(problem.startswith(names[2]) for problem in report["problems"])


def save_base_model_keys(directory, model):
    """`model` saved as the Hub's OPT checkpoints are (facebook/opt-125m): the bare base model's keys,
    `decoder.layers.0.fc1.weight`, without the causal LM's `model.` prefix; config.json of the causal LM."""
    directory.mkdir()
    model.config.save_pretrained(directory)
    tensors = {key: tensor.contiguous() for key, tensor in model.model.state_dict().items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    tiny_tokenizer().save_pretrained(directory)
    return directory


def test_verify_reads_a_hub_opt_checkpoint_without_the_model_prefix(tmp_path, capsys):
    from spp_cli.stages.prune import prune

    dense = save_base_model_keys(tmp_path / "opt", random_model("opt"))
    assert "decoder.layers.0.fc1.weight" in load_file(dense / "model.safetensors")
    prune(str(dense), tmp_path / "pruned", method="magnitude", sparsity=0.5, device="cpu")
    code, out, err = run_spp(["verify", tmp_path / "pruned", "--against", dense, "--format", "json"], capsys)
    report = json.loads(out)
    assert code == 0, err
    assert report["lost_zeros"] == 0 and report["extra_zeros"] > 0 and len(report["layers"]) == 12

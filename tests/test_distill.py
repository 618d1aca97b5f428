"""Distillation from the dense teacher (`spp finetune --objective distill`): the KL against its formula, a model
distilled into itself neither moves nor has a loss, a pruned student's KL falls with every zero kept, weight 0 is
the SFT run, the teacher found through spp.json's parent chain, and the vocabulary check."""

import copy
import json
import shutil

import pytest
import torch
from test_trainer import alpaca_records, small_config, zero_hashes
from tiny_models import decoder_linears, pruned_tiny_llama, tiny_llama, tiny_tokenizer

from spp_cli.data.examples import IGNORE_INDEX
from spp_cli.errors import BadInput
from spp_cli.training.distill import Distillation, next_token_kl
from spp_cli.training.teacher import check_teacher, dense_ancestor, find_teacher, vocabulary_difference
from spp_cli.training.trainer import merge_trained, run_finetune


def test_next_token_kl_is_the_formula_on_the_shifted_target_positions():
    generator = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(2, 5, 7, generator=generator) for _ in range(2))
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 4, 1, IGNORE_INDEX], [3, 2, 6, 0, 5]])
    kl_sum, tokens = next_token_kl(student, teacher, labels, temperature=2.0)
    want, count = 0.0, 0
    for row in range(2):
        for position in range(4):  # the logits at t predict token t + 1
            if labels[row, position + 1] != IGNORE_INDEX:
                p = torch.softmax(teacher[row, position] / 2, -1)
                q = torch.softmax(student[row, position] / 2, -1)
                want += float((p * (p.log() - q.log())).sum())
                count += 1
    assert int(tokens) == count == 6 and float(kl_sum) == pytest.approx(want, rel=1e-5)
    assert float(next_token_kl(student, student.clone(), labels, 1.0)[0]) == 0.0  # exactly
    # the hand-written gradient (q - p) is autograd's through the formula
    leaf = student.clone().requires_grad_(True)
    next_token_kl(leaf, teacher, labels, 2.0)[0].backward()
    reference = student.clone().requires_grad_(True)
    targets = labels[:, 1:] != IGNORE_INDEX
    torch.nn.functional.kl_div(torch.log_softmax(reference[:, :-1][targets] / 2, -1),
                               torch.log_softmax(teacher[:, :-1][targets] / 2, -1), reduction="sum",
                               log_target=True).backward()
    assert torch.allclose(leaf.grad, reference.grad, atol=1e-6) and leaf.grad[:, -1].abs().sum() == 0


def distill_config(**overrides):
    return small_config(**{"objective": "distill", "val_size": 0, "weight_decay": 0.0, **overrides})


@pytest.mark.parametrize("method, options", [("masked-full", {"lr": 3e-3}), ("lora", {"lr": 3e-2, "dropout": 0.0})])
def test_a_model_distilled_into_itself_has_no_loss_and_does_not_move(method, options, tmp_path):
    """Teacher = student: the KL and its gradient are exactly 0, so AdamW (weight decay 0) changes nothing."""
    model = tiny_llama(init_std=0.3)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    objective = Distillation(copy.deepcopy(model))
    result = run_finetune(model, tiny_tokenizer(), alpaca_records(), distill_config(method=method, max_steps=2,
                          **options), tmp_path, target_names=decoder_linears(model), objective=objective)
    assert abs(result.train_curve[0]["loss"]) < 1e-6 and [e["kl"] for e in result.kl_curve] == [0.0, 0.0]
    merged = merge_trained(result).state_dict()
    assert all(torch.equal(merged[name], before[name]) for name in before)


def test_a_pruned_student_moves_towards_its_dense_teacher_and_keeps_every_zero(tmp_path):
    teacher = tiny_llama(init_std=0.3)  # pruned_tiny_llama is this model with half of each projection zeroed
    model = pruned_tiny_llama(init_std=0.3)
    before = zero_hashes(model)
    config = distill_config(method="masked-full", lr=3e-3, max_steps=6)
    result = run_finetune(model, tiny_tokenizer(), alpaca_records(), config, tmp_path,
                          target_names=decoder_linears(model), objective=Distillation(teacher, 2.0))
    kl = [entry["kl"] for entry in result.kl_curve]
    assert len(kl) == 6 and kl[-1] < 0.7 * kl[0], kl
    assert result.train_curve[0]["loss"] == pytest.approx(4.0 * kl[0], rel=1e-4)  # T^2 x KL at weight 1
    assert zero_hashes(merge_trained(result)) == before


def test_weight_zero_is_the_sft_run(tmp_path):
    records, teacher = alpaca_records(), tiny_llama(init_std=0.3)
    curves = []
    for objective in (None, Distillation(teacher, weight=0.0)):
        model = pruned_tiny_llama(init_std=0.3)
        result = run_finetune(model, tiny_tokenizer(), records, small_config(max_steps=2, val_size=0),
                              tmp_path / str(len(curves)), target_names=decoder_linears(model), objective=objective)
        curves.append([entry["loss"] for entry in result.train_curve])
    assert curves[0] == curves[1]


# ---- the teacher: found, present, same vocabulary ----


def write_manifest(folder, parent: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spp.json").write_text(json.dumps({"stage": "x", "parent": {"path": parent}}))
    return str(folder)


def test_the_dense_ancestor_is_the_first_model_of_the_parent_chain_without_spp_json(tmp_path):
    dense = tmp_path / "dense"
    dense.mkdir()
    pruned = write_manifest(tmp_path / "pruned", str(dense))
    tuned = write_manifest(tmp_path / "tuned", pruned)
    assert dense_ancestor(tuned) == dense_ancestor(pruned) == str(dense)
    assert dense_ancestor(str(dense)) is None  # nothing records where a plain model came from
    assert dense_ancestor(write_manifest(tmp_path / "hub", "org/model")) == "org/model"
    assert find_teacher(None, None, str(dense)) == str(dense)  # a recipe's not-yet-written stage: its root model
    assert find_teacher(None, None, tuned) == str(dense)
    assert find_teacher("given", tuned, None) == "given"


def test_a_teacher_with_another_tokenizer_table_is_refused(tmp_path):
    from spp_cli.io.checkpoint import resolve_model_path

    tiny = resolve_model_path("builtin:tiny-llama")
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    assert vocabulary_difference(tiny, str(other)) is None
    table = json.loads((other / "tokenizer.json").read_text())
    (other / "tokenizer.json").write_text(json.dumps(table, indent=1))  # other bytes, same table: the same
    assert vocabulary_difference(tiny, str(other)) is None
    vocab = table["model"]["vocab"]
    first, second = list(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(table))
    with pytest.raises(BadInput, match=r"--teacher '.*other' has another vocabulary than the student .*their "
                                       r"tokenizer.json token tables differ\): distill from a teacher"):
        check_teacher(str(other), tiny, None)


# ---- the stage, the recipe, the API ----


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """A saved random dense model (vocabulary 320) and its magnitude-pruned child with an spp.json."""
    from tiny_models import save_random_model

    from spp_cli.stages.prune import prune

    root = tmp_path_factory.mktemp("lineage")
    save_random_model(root / "dense")
    prune(str(root / "dense"), root / "pruned", method="magnitude", sparsity=0.5, device="cpu")
    return root


def test_the_stage_distills_from_the_dense_ancestor_and_records_it(lineage, tmp_path):
    from tiny_models import ALPACA

    from spp_cli.stages.finetune import finetune
    from spp_cli.stages.verify import verify_checkpoint

    options = dict(data=str(ALPACA), max_steps=2, batch_size=4, micro_batch_size=4, seqlen=32, val_size=0,
                   logging_steps=1, device="cpu", method="spp")
    events = []
    manifest = finetune(str(lineage / "pruned"), tmp_path / "out", objective="distill", distill_temperature=2.0,
                        distill_weight=0.5, on_event=events.append, **options)
    distillation = manifest["distillation"]
    assert distillation["teacher"] == {"path": str((lineage / "dense").resolve()), "revision": None,
                                       "manifest_sha256": None}
    assert (distillation["temperature"], distillation["weight"]) == (2.0, 0.5)
    assert [entry["step"] for entry in manifest["training"]["kl_curve"]] == [1, 2]
    assert manifest["config"]["objective"] == "distill" and manifest["applied"]["teacher_memory_mb"] > 0
    assert any(e.kind == "note" and str(e.payload).startswith("distilling from") for e in events)
    assert verify_checkpoint(tmp_path / "out", against=lineage / "pruned")["ok"]
    sft = finetune(str(lineage / "pruned"), tmp_path / "sft", **options)  # sft records none of it
    assert "distillation" not in sft and "kl_curve" not in sft["training"] and "objective" not in sft["config"]


def test_a_recipe_finds_the_teacher_of_a_stage_not_yet_written_and_options_need_distill(lineage, tmp_path, capsys):
    import yaml
    from conftest import run_spp

    import spp_cli

    stages = [{"name": "prune", "type": "prune", "method": "magnitude"},
              {"name": "ft", "type": "finetune", "data": "builtin:python-docs:train", "seqlen": 64,
               "objective": "distill"}]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(lineage / "dense"), "output_dir": str(tmp_path / "run"),
                                      "stages": stages}))
    assert run_spp(["run", str(recipe), "--dry-run"], capsys)[0] == 0  # the teacher: the recipe's dense model
    code, _, err = run_spp(["run", str(recipe), "stages.ft.objective=sft", "stages.ft.distill_weight=0.5",
                            "--dry-run"], capsys)
    assert code == 2 and "stages[1] (ft).distill_weight: applies to objective distill" in err, err
    with pytest.raises(BadInput, match="^teacher: applies to objective distill"):
        spp_cli.finetune(str(lineage / "pruned"), tmp_path / "out", data="builtin:python-docs:train",
                         teacher=str(lineage / "dense"))

"""Recipe loading: schema, validation messages, YAML traps, overrides, paths, resolved dumps (spp_cli/recipe/)."""

import subprocess
import sys
from pathlib import Path

import pytest

from spp_cli.errors import BadInput
from spp_cli.recipe.reference import describe_schema
from spp_cli.recipe.resolve import (
    EvalStage,
    FinetuneStage,
    PruneStage,
    Recipe,
    dump_resolved,
    load_recipe,
    parse_recipe,
)

QUICKSTART = """\
model: builtin:tiny-llama
output_dir: runs/quickstart
seed: 0
stages:
  - name: prune
    type: prune
    method: wanda
    sparsity: 0.7
    pattern: unstructured
    calib: builtin:python-docs:train
    nsamples: 64
    seqlen: 256
  - name: finetune
    type: finetune
    method: spp
    data: builtin:python-docs:train
    max_steps: 200
    lr: 4e-3
  - name: eval
    type: eval
    models: [dense, prune, finetune]
    tasks: [ppl:builtin:python-docs:test]
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str = QUICKSTART, *overrides: str) -> Recipe:
    return load_recipe(write(tmp_path, text), overrides)


def error(tmp_path: Path, text: str = QUICKSTART, *overrides: str) -> str:
    """The BadInput message for this recipe, checked to be one line."""
    with pytest.raises(BadInput) as caught:
        load(tmp_path, text, *overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def edit(old: str, new: str, text: str = QUICKSTART) -> str:
    assert old in text
    return text.replace(old, new, 1)


# ------------------------------------------------------------------------------------------------ parsing


def test_quickstart_parses_with_defaults_and_resolved_references(tmp_path):
    recipe = load(tmp_path)
    prune, finetune, evaluate = recipe.stages
    assert isinstance(prune, PruneStage) and isinstance(finetune, FinetuneStage) and isinstance(evaluate, EvalStage)
    assert recipe.model == "builtin:tiny-llama"
    assert recipe.output_dir == str(tmp_path / "runs" / "quickstart")
    assert recipe.stage_dir("prune") == tmp_path / "runs" / "quickstart" / "prune"
    assert (prune.input, prune.method, prune.sparsity, prune.pattern, prune.nsamples, prune.seqlen) == (
        "dense",
        "wanda",
        0.7,
        "unstructured",
        64,
        256,
    )
    assert prune.seed == 0 and prune.device == "auto" and prune.dtype == "auto" and prune.calib.startswith("builtin:")
    assert finetune.input == "prune"
    assert finetune.lr == 0.004 and isinstance(finetune.lr, float)  # YAML 1.1 would read 4e-3 as a string
    assert (finetune.max_steps, finetune.epochs, finetune.batch_size, finetune.micro_batch_size) == (200, 3.0, 128, 8)
    # the method-specific options stay None (not given) in the recipe; the method fills its defaults
    assert (finetune.seed, finetune.groups, finetune.dropout, finetune.forward, finetune.report_to) == (
        42,
        None,
        None,
        None,
        "none",
    )
    assert (finetune.weight_decay, finetune.warmup_ratio, finetune.val_size, finetune.save_steps) == (
        0.001,
        0.03,
        None,
        200,  # the engine's real default (the schema once said "Trainer's")
    )
    assert evaluate.models == ["dense", "prune", "finetune"]
    assert evaluate.tasks == ["ppl:builtin:python-docs:test"]
    assert (evaluate.batch_size, evaluate.limit, evaluate.seqlen) == (1, None, None)
    assert recipe.stage_names == ["prune", "finetune", "eval"]


def test_options_are_ordered_complete_and_resolved(tmp_path):
    options = load(tmp_path).stages[0].options()
    assert list(options)[:4] == ["name", "type", "input", "method"]
    assert list(options)[-2:] == ["device", "dtype"]
    assert options["type"] == "prune" and options["seed"] == 0 and options["device"] == "auto"


def test_default_names_inputs_and_models(tmp_path):
    text = """\
model: org/base
stages:
  - {type: prune, method: magnitude, pattern: "4:8"}
  - {type: eval, tasks: "wikitext2, boolq"}
  - {type: finetune, data: alpaca, input: prune, name: tune}
  - {type: eval, name: eval2, tasks: wikitext2}
"""
    recipe = load(tmp_path, text)
    assert recipe.stage_names == ["prune", "eval", "tune", "eval2"]
    assert recipe.stages[1].models == ["prune"] and recipe.stages[1].tasks == ["wikitext2", "boolq"]
    assert recipe.stages[2].input == "prune"
    assert recipe.stages[3].input == "tune" and recipe.stages[3].models == ["tune"]  # eval stages are skipped
    assert recipe.stages[0].sparsity == 0.5 and recipe.stages[0].pattern == "4:8"
    assert recipe.model == "org/base"  # a hub id that does not exist locally stays as it is
    assert recipe.output_dir == str(tmp_path / "runs" / "recipe")


def test_prune_seed_defaults_to_the_recipe_seed_and_stage_device_overrides(tmp_path):
    recipe = load(tmp_path, edit("seed: 0", "seed: 5\ndevice: cpu\ndtype: float32"), "stages.finetune.device=cuda:1")
    assert recipe.stages[0].seed == 5 and recipe.stages[1].seed == 42
    assert [s.device for s in recipe.stages] == ["cpu", "cuda:1", "cpu"]
    assert [s.dtype for s in recipe.stages] == ["float32"] * 3


# ------------------------------------------------------------------------------------------------ YAML 1.1 traps


def test_bare_nm_pattern_is_a_string_not_sexagesimal_124(tmp_path):
    recipe = load(tmp_path, edit("    sparsity: 0.7\n    pattern: unstructured", "    pattern: 2:4"))
    assert recipe.stages[0].pattern == "2:4"
    assert recipe.stages[0].sparsity == 0.5


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    recipe = load(tmp_path, edit("max_steps: 200", "max_steps: 1e3\n    weight_decay: 1E-2"))
    assert recipe.stages[1].max_steps == 1000 and isinstance(recipe.stages[1].max_steps, int)
    assert recipe.stages[1].weight_decay == 0.01


def test_yes_no_on_off_only_in_bool_keys(tmp_path):
    recipe = load(tmp_path, edit("    seqlen: 256", "    seqlen: 256\n    use_variant: yes\n    true_sequential: Off"))
    assert recipe.stages[0].use_variant is True and recipe.stages[0].true_sequential is False
    assert error(tmp_path, edit("max_steps: 200", "max_steps: 200\n    report_to: off")) == (
        f"{tmp_path / 'recipe.yaml'}: stages[1] (finetune).report_to: 'off' is not one of none, tensorboard, wandb"
    )


def test_a_boolean_where_a_number_is_expected_is_a_type_error(tmp_path):
    message = error(tmp_path, edit("sparsity: 0.7", "sparsity: true"))
    assert message == (
        f"{tmp_path / 'recipe.yaml'}: stages[0] (prune).sparsity: true is a boolean, not a number; "
        "use a number in (0, 1)"
    )
    assert error(tmp_path, edit("nsamples: 64", "nsamples: yes")).endswith(
        "stages[0] (prune).nsamples: 'yes' is not a number; use an integer >= 1"
    )


def test_yaml_syntax_error_names_the_line(tmp_path):
    text = edit("    method: wanda", "    method: wanda: sparsegpt")  # line 7
    message = error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'recipe.yaml'} line 7: could not parse YAML (mapping values are not")


def test_duplicate_yaml_key_is_an_error_not_last_one_wins(tmp_path):
    message = error(tmp_path, edit("    sparsity: 0.7", "    sparsity: 0.7\n    sparsity: 0.5"))
    path = tmp_path / "recipe.yaml"
    assert message == f"{path} line 9: could not parse YAML (found duplicate key 'sparsity'); write each key once"


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("sparsity: 0.7", "sparsity: 1.5", "stages[0] (prune).sparsity: 1.5 is out of range; use a number in (0, 1)"),
        ("sparsity: 0.7", "sparsity: 0", "stages[0] (prune).sparsity: 0 is out of range; use a number in (0, 1)"),
        ("sparsity: 0.7", "sparsity: abc", "stages[0] (prune).sparsity: 'abc' is not a number; use a number in (0, 1)"),
        ("nsamples: 64", "nsamples: 0", "stages[0] (prune).nsamples: 0 is out of range; use an integer >= 1"),
        ("nsamples: 64", "nsamples: 1.5", "stages[0] (prune).nsamples: 1.5 is not an integer; use an integer >= 1"),
        ("seqlen: 256", "seqlen: -1", "stages[0] (prune).seqlen: -1 is out of range; use an integer >= 2"),
        (
            "method: wanda",
            "method: wand",
            "stages[0] (prune).method: 'wand' is not one of magnitude, wanda, sparsegpt; did you mean 'wanda'?",
        ),
        (
            "type: prune",
            "type: pruning",
            "stages[0].type: 'pruning' is not one of prune, finetune, eval; did you mean 'prune'?",
        ),
        ("    type: prune\n", "", "stages[0].type: missing; use one of prune, finetune, eval"),
        ("    method: wanda\n", "", "stages[0] (prune).method: missing; use one of magnitude, wanda, sparsegpt"),
        (
            "pattern: unstructured",
            "pattern: 4:2",
            "stages[0] (prune).pattern: N:M 4:2 is invalid; need 0 < N < M (e.g. 2:4)",
        ),
        (
            "pattern: unstructured",
            "pattern: '0:4'",
            "stages[0] (prune).pattern: N:M 0:4 is invalid; need 0 < N < M (e.g. 2:4)",
        ),
        (
            "pattern: unstructured",
            "pattern: blocky",
            "stages[0] (prune).pattern: 'blocky' is not unstructured or N:M (e.g. 2:4)",
        ),
        (
            "pattern: unstructured",
            "pattern: 2:4",
            "stages[0] (prune).sparsity: 0.7 contradicts pattern 2:4 (= 0.5); drop sparsity or make it 0.5",
        ),
        (
            "method: wanda",
            "method: magnitude\n    use_variant: true",
            "stages[0] (prune).use_variant: is a Wanda option: drop it or use method wanda",
        ),
        (
            "seqlen: 256",
            "seqlen: 256\n    targets: 'q_proj('",
            "stages[0] (prune).targets: 'q_proj(' is not a valid "
            "regular expression (missing ), unterminated subpattern at position 6)",
        ),
        (
            "seqlen: 256",
            "seqlen: 256\n    device: gpu",
            "stages[0] (prune).device: 'gpu' is not auto, cpu, cuda or cuda:N",
        ),
        ("lr: 4e-3", "lr: 0", "stages[1] (finetune).lr: 0 is out of range; use a number > 0"),
        (
            "lr: 4e-3",
            "lr: 4e-3\n    dropout: 1",
            "stages[1] (finetune).dropout: 1 is out of range; use a number in [0, 1)",
        ),
        (
            "lr: 4e-3",
            "lr: 4e-3\n    batch_size: 100",
            "stages[1] (finetune).batch_size: 100 is not a multiple of "
            "micro_batch_size 8; the global batch is micro_batch_size x accumulation steps x world size",
        ),
        (
            "lr: 4e-3",
            "lr: 4e-3\n    forward: fast",
            "stages[1] (finetune).forward: 'fast' is not one of auto, naive, recompute, fused",
        ),
        (
            "    data: builtin:python-docs:train\n",
            "",
            "stages[1] (finetune).data: missing; use a SOURCE: a "
            ".txt/.jsonl/.json path, builtin:NAME[:SPLIT], alpaca, alpaca-gpt4 or hf:ORG/NAME[:SPLIT]",
        ),
        (
            "tasks: [ppl:builtin:python-docs:test]",
            "tasks: []",
            "stages[2] (eval).tasks: [] is not a list of tasks "
            "(lm-eval names, wikitext2, c4, ppl:SOURCE) or one comma-separated string",
        ),
        (
            "models: [dense, prune, finetune]",
            "models: [dense, prune, dense]",
            "stages[2] (eval).models: 'dense' is listed twice; list each model once",
        ),
        ("seed: 0", "seed: abc", "seed: 'abc' is not a number; use an integer >= 0"),
        ("seed: 0", "seed: 0\ntrust_remote_code: maybe", "trust_remote_code: 'maybe' is not true or false"),
        ("model: builtin:tiny-llama\n", "", "model: missing; use a hub id, a local model folder or builtin:tiny-llama"),
    ],
)
def test_bad_values_name_the_key_path_and_what_is_allowed(tmp_path, old, new, expected):
    assert error(tmp_path, edit(old, new)) == f"{tmp_path / 'recipe.yaml'}: {expected}"


def test_unknown_keys_suggest_the_closest_key(tmp_path):
    path = tmp_path / "recipe.yaml"
    message = error(tmp_path, edit("lr: 4e-3", "learning_rate: 4e-3"))
    assert message.startswith(
        f"{path}: stages[1] (finetune): unknown key 'learning_rate'; did you mean 'lr'? (allowed: name, type, input, "
        "method, data, max_steps, epochs, lr,"
    )
    assert message.endswith("save_steps, logging_steps, device, dtype)")
    assert "did you mean 'nsamples'?" in error(tmp_path, edit("nsamples: 64", "nsample: 64"))
    assert "did you mean 'micro_batch_size'?" in error(tmp_path, edit("lr: 4e-3", "micro-batch-size: 4"))
    assert error(tmp_path, edit("seed: 0", "seed: 0\noutdir: x")).startswith(
        f"{path}: unknown key 'outdir'; did you mean 'output_dir'? (allowed: model, output_dir, seed,"
    )
    assert error(tmp_path, edit("seqlen: 256", "seqlen: 256\n    tasks: [boolq]")).startswith(
        f"{path}: stages[0] (prune): unknown key 'tasks'; 'tasks' is a key of eval stages (allowed: name,"
    )


def test_stage_names_must_be_unique_and_usable_as_folders(tmp_path):
    path = tmp_path / "recipe.yaml"
    assert error(tmp_path, edit("name: finetune", "name: prune")) == (
        f"{path}: stages[1] (prune).name: 'prune' is already used by stages[0]; give each stage a unique name"
    )
    assert error(tmp_path, edit("name: prune", "name: dense")) == (
        f"{path}: stages[0] (dense).name: 'dense' is reserved for the recipe's model; pick another name"
    )
    assert error(tmp_path, edit("name: prune", "name: my/prune")).startswith(
        f"{path}: stages[0] (my/prune).name: 'my/prune' is not a valid stage name;"
    )


def test_references_must_name_dense_an_earlier_model_stage_a_path_or_a_hub_id(tmp_path):
    path = tmp_path / "recipe.yaml"
    assert error(tmp_path, edit("method: wanda", "method: wanda\n    input: finetune")) == (
        f"{path}: stages[0] (prune).input: 'finetune' names a later stage (stages[1]); "
        "a stage can only read dense or an earlier stage"
    )
    assert error(tmp_path, edit("method: spp", "method: spp\n    input: prnue")) == (
        f"{path}: stages[1] (finetune).input: 'prnue' is not a stage, a local folder or a hub id; "
        "did you mean 'prune'? (earlier models: dense, prune)"
    )
    assert error(tmp_path, edit("[dense, prune, finetune]", "[dense, prune, tuned]")).startswith(
        f"{path}: stages[2] (eval).models: 'tuned' is not a stage, a local folder or a hub id"
    )
    text = QUICKSTART + "  - {type: eval, name: again, models: [eval], tasks: wikitext2}\n"
    assert error(tmp_path, text) == (
        f"{path}: stages[3] (again).models: 'eval' is an eval stage and writes no model; "
        "use dense or a prune/finetune stage"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "expected a mapping with model: and stages: at the top level, got nothing (the file is empty)"),
        ("- a\n- b\n", "expected a mapping with model: and stages: at the top level, got a list"),
        ("5\n", "expected a mapping with model: and stages: at the top level, got an integer"),  # was "a int"
        ("wanda\n", "expected a mapping with model: and stages: at the top level, got a string"),
        ("model: x\n", "stages: missing; use a non-empty list of stages, each with type: prune, finetune or eval"),
        (
            "model: x\nstages: []\n",
            "stages: [] is not allowed; use a non-empty list of stages, each with type: prune, finetune or eval",
        ),
        (
            "model: x\nstages: [prune]\n",
            "stages[0]: expected a mapping with type: prune, finetune or eval, got 'prune'",
        ),
    ],
)
def test_bad_structure(tmp_path, text, expected):
    assert error(tmp_path, text) == f"{tmp_path / 'recipe.yaml'}: {expected}"


def test_unreadable_recipe_files(tmp_path):
    with pytest.raises(BadInput, match=r"missing\.yaml: no such recipe file; check the path$"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "latin1.yaml").write_bytes("model: caf\xe9\n".encode("latin-1"))
    with pytest.raises(BadInput, match=r"latin1\.yaml: is not UTF-8 text"):
        load_recipe(tmp_path / "latin1.yaml")


# ------------------------------------------------------------------------------------------------ overrides


def test_overrides_parse_values_as_yaml_scalars(tmp_path):
    recipe = load(
        tmp_path,
        QUICKSTART,
        "stages.prune.sparsity=0.6",
        "seed=7",
        "stages.eval.tasks=wikitext2,boolq",
        "stages.finetune.lr=1e-4",
        "stages.finetune.mask_prompt=yes",
        "stages.prune.seqlen=",
    )
    assert recipe.stages[0].sparsity == 0.6 and recipe.seed == 7 and recipe.stages[0].seed == 7
    assert recipe.stages[2].tasks == ["wikitext2", "boolq"]
    assert recipe.stages[1].lr == 1e-4 and recipe.stages[1].mask_prompt is True
    assert recipe.stages[0].seqlen is None  # an empty value is null: back to the default


def test_override_bare_nm_pattern_and_dropping_sparsity(tmp_path):
    recipe = load(tmp_path, QUICKSTART, "stages.prune.pattern=2:4", "stages.prune.sparsity=")
    assert recipe.stages[0].pattern == "2:4" and recipe.stages[0].sparsity == 0.5
    recipe = load(tmp_path, QUICKSTART, "stages.0.pattern=4:8", "stages.0.sparsity=0.5")  # by index too
    assert recipe.stages[0].pattern == "4:8"


def test_override_errors_name_the_override(tmp_path):
    assert error(tmp_path, QUICKSTART, "stages.prune.sparsity=1.5") == (
        "override stages.prune.sparsity=1.5: stages[0] (prune).sparsity: 1.5 is out of range; use a number in (0, 1)"
    )
    assert error(tmp_path, QUICKSTART, "stages.prnue.sparsity=0.6") == (
        "override stages.prnue.sparsity=0.6: no stage named 'prnue'; did you mean 'prune'? "
        "(stages: prune, finetune, eval)"
    )
    assert error(tmp_path, QUICKSTART, "stages.finetune.learning_rate=1e-4").startswith(
        "override stages.finetune.learning_rate=1e-4: stages[1] (finetune): unknown key 'learning_rate'; "
        "did you mean 'lr'?"
    )
    assert error(tmp_path, QUICKSTART, "sede=1").startswith("override sede=1: unknown key 'sede'; did you mean 'seed'?")
    assert error(tmp_path, QUICKSTART, "seed") == (
        "override 'seed' is not KEY=VALUE; use e.g. stages.prune.sparsity=0.6 or seed=1"
    )
    assert error(tmp_path, QUICKSTART, "stages.prune=1") == (
        "override 'stages.prune=1': use stages.<stage name>.<key>=value or <top-level key>=value"
    )
    assert error(tmp_path, QUICKSTART, "stages.prune.sparsity=[0.5").startswith(
        "override stages.prune.sparsity=[0.5 line 1: could not parse YAML ("
    )


def test_overrides_do_not_change_the_callers_data():
    data = {"model": "x", "stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]}
    recipe = parse_recipe(data, overrides=["stages.prune.sparsity=0.6"])
    assert recipe.stages[0].sparsity == 0.6 and data["stages"][0]["sparsity"] == 0.5


# ------------------------------------------------------------------------------------------------ paths


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    folder = tmp_path / "recipes"
    (folder / "local-model").mkdir(parents=True)
    text = """\
model: local-model
stages:
  - {type: prune, method: wanda, sparsity: 0.5, calib: data/calib.jsonl}
  - {type: finetune, data: ./train, input: ../models/other}
  - {type: finetune, name: tune2, data: alpaca, input: org/name}
  - type: eval
    models: [dense, prune, /abs/model, ~/m]
    tasks: [wikitext2, ppl:held-out.txt, ppl:builtin:python-docs:test, ppl:c4]
    data_dir: offline
  - {type: prune, name: p2, method: magnitude, sparsity: 0.5, calib: c4}
  - {type: prune, name: p3, method: magnitude, sparsity: 0.5, calib: "hf:allenai/c4:train"}
"""
    recipe = load_recipe(write(folder, text, "paper.yaml"))
    prune, finetune, tune2, evaluate, p2, p3 = recipe.stages
    assert recipe.model == str(folder / "local-model")  # exists next to the recipe
    assert recipe.output_dir == str(folder / "runs" / "paper")
    assert prune.calib == str(folder / "data" / "calib.jsonl")  # a data suffix: a path even if missing
    assert finetune.data == str(folder / "train") and finetune.input == str(tmp_path / "models" / "other")
    assert (tune2.data, tune2.input) == ("alpaca", "org/name")
    assert evaluate.models == ["dense", "prune", "/abs/model", str(Path("~/m").expanduser())]
    assert evaluate.tasks == ["wikitext2", f"ppl:{folder / 'held-out.txt'}", "ppl:builtin:python-docs:test", "ppl:c4"]
    assert evaluate.data_dir == str(folder / "offline")
    assert p2.calib == "c4" and p3.calib == "hf:allenai/c4:train"


def test_override_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    path = write(folder, QUICKSTART)
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path, ["stages.prune.calib=./mine.txt", "output_dir=out"])
    assert recipe.stages[0].calib == str(tmp_path / "mine.txt")
    assert recipe.output_dir == str(tmp_path / "out")
    assert load_recipe(path).output_dir == str(folder / "runs" / "quickstart")


# ------------------------------------------------------------------------------------------------ provenance


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load(tmp_path, QUICKSTART, "stages.prune.pattern=2:4", "stages.prune.sparsity=")
    text = dump_resolved(recipe, recipe.stages[0])
    assert text.startswith("# spp: the resolved recipe, saved by stage 'prune' (prune)")
    assert "pattern: '2:4'" in text  # quoted, so YAML 1.1 readers get the string too
    again = load_recipe(write(tmp_path / "runs" / "quickstart" / "prune", text, "recipe.yaml"))
    assert again == recipe
    assert recipe.to_yaml_dict()["stages"][1] == recipe.stages[1].options()


def test_describe_schema_lists_every_key_with_its_default():
    rows = describe_schema()
    assert ("prune", "sparsity", "float | None", "0.5; N/M for N:M", "a number in (0, 1)") in rows
    lr_defaults = "spp 0.004, lora 0.0003, masked-lora 0.0003, ia3 0.003, masked-full 2e-05"  # each method's own
    assert ("finetune", "lr", "float | None", lr_defaults, "a number > 0") in rows
    assert ("finetune", "report_to", "str", "none", "one of none, tensorboard, wandb") in rows
    assert ("eval", "batch_size", "int", "1", "an integer >= 1") in rows
    assert ("recipe", "seed", "int", "0", "an integer >= 0") in rows
    for section, cls in [("prune", PruneStage), ("finetune", FinetuneStage), ("eval", EvalStage)]:
        keys = [key for stage_type, key, *_ in rows if stage_type == section]
        assert keys == ["name", "type", *(k for k in cls().options() if k not in ("name", "type"))]


def test_import_stays_light():
    code = "import sys, spp_cli.recipe.resolve; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_readme_recipe_reference_is_the_schema():
    """README's key table is generated from the schema (scripts/readme_tables.py); a drift fails here."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for section, key, kind, default, allowed in describe_schema():
        assert f"| {section} | `{key}` | {kind} | {default} | {allowed} |" in readme, (section, key)


def test_top_level_x_keys_hold_anchors_and_are_ignored(tmp_path):
    """x-... keys at the top level are the author's (YAML anchors the stages share, as compose files do); any other
    unknown key is still refused."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: builtin:tiny-llama\nx-prune: &prune {type: prune, method: magnitude}\n"
                      "stages:\n  - {<<: *prune, name: a, sparsity: 0.6}\n  - {<<: *prune, name: b}\n")
    stages = load_recipe(recipe).stages
    assert [(s.name, s.method, s.sparsity) for s in stages] == [("a", "magnitude", 0.6), ("b", "magnitude", 0.5)]
    recipe.write_text("model: builtin:tiny-llama\ny-prune: 1\nstages:\n  - {type: prune}\n")
    with pytest.raises(BadInput, match="unknown key 'y-prune'"):
        load_recipe(recipe)

"""Every preflight rule through all three entry points: the command, a recipe (`spp run`) and the Python API give the
same exit 2 and the same one line, before any weights load (in seconds), leaving nothing behind."""

import importlib.util
import json
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_spp

import spp_cli
from spp_cli.errors import BadInput

SOURCE = "builtin:python-docs:train"
MAX_SECONDS = 10


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """The tiny model pruned by magnitude (no calibration): a finetune stage's input with an spp.json."""
    from spp_cli.eval.zeroshot import lm_eval_task_names

    lm_eval_task_names()  # the first lookup on a machine indexes lm-eval's ~15k task YAMLs once (5-15 s), then cached
    out = tmp_path_factory.mktemp("entry") / "pruned"
    spp_cli.prune("builtin:tiny-llama", out, method="magnitude", sparsity=0.5)
    return out


@pytest.fixture(scope="module")
def other_vocabulary(tmp_path_factory) -> Path:
    """A model whose vocabulary (320 tokens) is not the tiny model's (4096): a teacher distill must refuse."""
    from tiny_models import save_random_model

    return save_random_model(tmp_path_factory.mktemp("entry") / "other-vocabulary")


# (id, stage type, its options, the model(s), a fragment of the one line)
RULES = [
    ("prune seqlen beyond the positions", "prune", {"method": "wanda", "calib": SOURCE, "seqlen": 100000},
     "builtin:tiny-llama", "--seqlen 100000 exceeds the model's 1024 positions"),
    ("prune calibration file missing", "prune", {"method": "wanda", "calib": "{tmp}/nowhere.jsonl"},
     "builtin:tiny-llama", "nowhere.jsonl"),
    ("finetune seqlen beyond the positions", "finetune", {"data": SOURCE, "seqlen": 100000},
     "{pruned}", "--seqlen 100000 exceeds the model's 1024 positions"),
    ("finetune data missing", "finetune", {"data": "{tmp}/nowhere.jsonl"}, "{pruned}", "nowhere.jsonl"),
    ("finetune logger not installed", "finetune", {"data": SOURCE, "report_to": "wandb"}, "{pruned}",
     "--report-to wandb needs the 'wandb' package"),
    ("finetune groups do not divide", "finetune", {"data": SOURCE, "groups": 7}, "{pruned}",
     "groups 7 does not divide"),
    ("finetune distill without a teacher", "finetune", {"data": SOURCE, "objective": "distill"},
     "builtin:tiny-llama", "objective distill needs a teacher: 'builtin:tiny-llama' has no spp.json"),
    ("finetune distill teacher missing", "finetune", {"data": SOURCE, "objective": "distill",
                                                      "teacher": "{tmp}/no-teacher"}, "{pruned}",
     "no-teacher' does not exist"),
    ("finetune distill teacher of another vocabulary", "finetune", {"data": SOURCE, "objective": "distill",
                                                                    "teacher": "{other}"}, "{pruned}",
     "has another vocabulary than the student"),
    ("finetune curve ppl data_dir not a folder", "finetune", {"data": SOURCE, "eval_steps": 2,
     "eval_ppl_source": "wikitext2", "eval_data_dir": "{tmp}/no-dir"}, "{pruned}", "no-dir' is not a directory"),
    ("eval seqlen beyond the positions", "eval", {"tasks": ["ppl:" + SOURCE], "seqlen": 100000},
     ["builtin:tiny-llama"], "--seqlen 100000 exceeds the model's 1024 positions"),
    ("eval unknown task", "eval", {"tasks": ["boolqq"]}, ["builtin:tiny-llama"], "boolqq"),
    ("eval second model missing", "eval", {"tasks": ["ppl:" + SOURCE]}, ["builtin:tiny-llama", "{tmp}/nowhere"],
     "nowhere"),
    ("eval data_dir not a folder", "eval", {"tasks": ["boolq"], "data_dir": "{tmp}/no-dir"}, ["builtin:tiny-llama"],
     "no-dir"),
    ("eval max_memory names a GPU this machine lacks", "eval",
     {"tasks": ["ppl:" + SOURCE], "device_map": "auto", "max_memory": "99=1GiB"}, ["builtin:tiny-llama"],
     "--max-memory names GPU 99, but this machine has"),
    ("eval offload_folder is a file", "eval",
     {"tasks": ["ppl:" + SOURCE], "device_map": "auto", "offload_folder": "{pruned}/config.json"},
     ["builtin:tiny-llama"], "config.json' is a file: give a folder"),
]


def fill(value, **places):
    if isinstance(value, str):
        return value.format(**places)
    if isinstance(value, list):
        return [fill(item, **places) for item in value]
    if isinstance(value, dict):
        return {key: fill(item, **places) for key, item in value.items()}
    return value


def flag_arguments(options: dict) -> list[str]:
    argv = []
    for key, value in options.items():
        argv += ["--" + key.replace("_", "-"), ",".join(value) if isinstance(value, list) else str(value)]
    return argv


def through_command(stage_type, options, model, out) -> tuple[int, str]:
    models = model if isinstance(model, list) else [model]
    command = "eval" if stage_type == "eval" else stage_type
    return command, [command, *models, *flag_arguments(options), "--out", str(out)]


def through_recipe(stage_type, options, model, tmp) -> list[str]:
    stage = {"name": "stage", "type": stage_type, **options}
    if stage_type == "eval":
        stage["models"] = model
        model = "builtin:tiny-llama"
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": model, "output_dir": str(tmp / "run"), "stages": [stage]}))
    return ["run", str(recipe)]


def through_api(stage_type, options, model, out) -> str:
    try:
        if stage_type == "eval":
            spp_cli.evaluate({str(i): m for i, m in enumerate(model)}, options.pop("tasks"), out, **options)
        else:
            getattr(spp_cli, stage_type)(model, out, **options)
    except BadInput as error:
        return f"spp: error: {error}"
    raise AssertionError("the API accepted the bad input")


def snapshot(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


@pytest.mark.parametrize("stage_type, options, model, message", [pytest.param(*row[1:], id=row[0]) for row in RULES])
def test_a_bad_input_is_the_same_line_through_every_entry_point(tmp_path, pruned, other_vocabulary, capsys,
                                                                 stage_type, options, model, message):
    if "wandb" in message and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here, so --report-to wandb is valid")
    places = {"tmp": tmp_path, "pruned": pruned, "other": other_vocabulary}
    options, model = fill(options, **places), fill(model, **places)
    out = tmp_path / ("results.json" if stage_type == "eval" else "out")
    before = snapshot(tmp_path)
    lines = {}
    for entry in ("command", "recipe", "api"):
        started = time.perf_counter()
        if entry == "api":
            lines[entry] = through_api(stage_type, json.loads(json.dumps(options)), model, out)
        else:
            argv = through_command(stage_type, options, model, out)[1] if entry == "command" else through_recipe(
                stage_type, options, model, tmp_path)
            code, _, err = run_spp(argv, capsys)
            assert code == 2, (entry, err)
            assert err.count("\n") == 1 and "Traceback" not in err, (entry, err)
            lines[entry] = err.strip()
        assert time.perf_counter() - started < MAX_SECONDS, entry
        (tmp_path / "recipe.yaml").unlink(missing_ok=True)
        assert snapshot(tmp_path) == before, entry  # nothing written, nothing left behind
    assert message in lines["command"], lines
    assert lines["command"] == lines["recipe"] == lines["api"], lines

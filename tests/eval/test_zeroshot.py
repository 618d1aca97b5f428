"""The offline task bundle: the 8 zero-shot tasks run from $SPP_TEST_DATA (or its committed cut), and render the
same requests as lm-eval's built-in task configs on the same records (HellaSwag aside: its local file is
preprocessed differently).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from conftest import HAVE_DATA, SOME_DATA

from spp_cli.errors import BadInput
from spp_cli.eval.engine import evaluate, validate_tasks
from spp_cli.eval.zeroshot import BUNDLE_TASKS, MEAN_ACC_TASKS, render_bundle, render_bundle_task, run_zeroshot

DATA_DIR = SOME_DATA
RECORDS = {"boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
           "arc_challenge": 1172, "openbookqa": 500, "piqa": 1838}
if not HAVE_DATA:  # tests/fixtures/data: the first 8 records of each (scripts/make_test_fixtures.py)
    RECORDS = dict.fromkeys(RECORDS, 8)
# The built-in lm-eval YAML of each task, relative to lm_eval/tasks/.
BUILTIN_YAML = {"boolq": "super_glue/boolq/default.yaml", "rte": "glue/rte/default.yaml",
                "winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml",
                "arc_challenge": "arc/arc_challenge.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
                "piqa": "piqa/piqa.yaml"}
LIMIT = 5


def _load_sibling(name: str):
    """tests/<name>.py as a module, whatever pytest's import mode (it holds the tiny-model fixture)."""
    spec = importlib.util.spec_from_file_location(f"_spp_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny():
    return _load_sibling("test_perplexity").tiny_model_and_tokenizer()


@pytest.fixture
def offline(monkeypatch):
    """Hugging Face offline mode, as on an air-gapped machine (env for spp, module flags for datasets/hub)."""
    import datasets
    import huggingface_hub

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_all_eight_tasks_run_offline_with_limit(tiny, offline):
    model, tokenizer = tiny
    result = evaluate(model, tokenizer, list(BUNDLE_TASKS), limit=LIMIT, data_dir=DATA_DIR, batch_size=4)
    assert list(result["results"]) == list(BUNDLE_TASKS)
    for task in BUNDLE_TASKS:
        metrics = result["results"][task]
        assert 0.0 <= metrics["acc,none"] <= 1.0 and metrics["alias"] == task
        assert result["n-samples"][task] == {"original": RECORDS[task], "effective": LIMIT}
        source = result["sources"][task]
        assert source["data"].startswith(str(DATA_DIR.resolve()))
        assert source["task_file"] == f"spp_cli/eval/tasks/{task}.yaml"
        assert source["prompt"].startswith("differs" if task in ("boolq", "hellaswag") else "same as lm-eval's")
    for task in ("hellaswag", "arc_easy", "arc_challenge", "openbookqa", "piqa"):
        assert 0.0 <= result["results"][task]["acc_norm,none"] <= 1.0
    mean = sum(result["results"][task]["acc,none"] for task in MEAN_ACC_TASKS) / 7
    assert result["mean_acc_7"] == pytest.approx(mean, abs=1e-12)
    assert "not bit-identical" in result["results"]["hellaswag"]["note"]
    assert "Title -- " in result["results"]["boolq"]["note"]
    assert sorted(note.split(":")[0] for note in result["notes"]) == ["boolq", "hellaswag", "limit 5"]
    assert result["bos"] == {"rule": "auto", "lm_eval_add_bos_token": None, "prepends_bos": True}
    assert result["perplexity"] == {}
    assert json.loads(json.dumps(result)) == result  # plain JSON, no numpy or custom types


# ------------------------------------------------------------ prompts equal to lm-eval's built-in tasks

def _hf_schema(task: str, record: dict) -> dict:
    """A local record mapped back into the HF dataset schema the built-in lm-eval YAML expects."""
    letters = [chr(ord("A") + i) for i in range(len(record.get("choices", [])))]
    if task == "boolq":
        passage, question = record["query"][len("Passage: "):].rsplit("\nQuestion: ", 1)
        return {"passage": passage, "question": question.removesuffix("?"), "label": record["gold"]}
    if task == "rte":
        return record
    if task in ("arc_easy", "arc_challenge"):
        return {"question": record["query"].removeprefix("Question: "), "answerKey": letters[record["gold"]],
                "choices": {"text": record["choices"], "label": letters}}
    if task == "openbookqa":
        return {"question_stem": record["query"], "answerKey": letters[record["gold"]],
                "choices": {"text": record["choices"], "label": letters}}
    if task == "piqa":
        return {"goal": record["query"].removeprefix("Question: ").removesuffix("\n"),
                "sol1": record["choices"][0], "sol2": record["choices"][1], "label": record["gold"]}
    if task == "winogrande":
        first, second = record["context_options"]
        cut = len(os.path.commonprefix([first, second]))
        return {"sentence": first[:cut] + "_ " + record["continuation"], "option1": first[cut:],
                "option2": second[cut:], "answer": str(record["gold"] + 1)}
    raise KeyError(task)


def _requests(task) -> list[tuple]:
    """What the model is asked: (doc index, choice index, (context, continuation)) for every request."""
    task.build_all_requests(limit=LIMIT)
    return [(request.doc_id, request.idx, request.arguments) for request in task.instances]


@pytest.mark.parametrize("task_name", sorted(BUILTIN_YAML))
def test_bundle_requests_equal_builtin_task_requests(task_name, tmp_path):
    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    render_bundle([task_name], DATA_DIR, tmp_path)
    bundle = TaskManager(include_defaults=False).load([str(tmp_path / f"{task_name}.yaml")])["tasks"][task_name]
    local_records = [bundle.eval_docs[i] for i in range(LIMIT)]

    builtin_config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / BUILTIN_YAML[task_name])
    for key in ("tag", "group"):
        builtin_config.pop(key, None)
    hf_records = datasets.Dataset.from_list([_hf_schema(task_name, dict(r)) for r in local_records])
    splits = {split: hf_records for split in ("train", "validation", "test")}
    builtin_config["custom_dataset"] = lambda **_: datasets.DatasetDict(splits)  # the records instead of the Hub
    builtin = ConfigurableTask(config=builtin_config)

    assert builtin.config.target_delimiter == bundle.config.target_delimiter == " "
    assert _requests(bundle) == _requests(builtin)  # same prompts, same choices, same order
    for local, hf in zip(local_records, builtin.eval_docs, strict=True):
        assert bundle.doc_to_target(local) == builtin.doc_to_target(hf)  # same gold answer
        assert bundle.doc_to_text(local) == builtin.doc_to_text(hf)


def test_rte_tsv_renders_the_same_requests_as_the_parquet(tmp_path):
    from lm_eval.tasks import TaskManager

    only_tsv = tmp_path / "data"
    (only_tsv / "rte").mkdir(parents=True)
    (only_tsv / "rte" / "dev.tsv").symlink_to(DATA_DIR / "rte" / "dev.tsv")
    assert render_bundle_task("rte", only_tsv)["dataset_path"] == "csv"
    tasks = {}
    for name, data_dir in (("parquet", DATA_DIR), ("tsv", only_tsv)):
        render_bundle(["rte"], data_dir, tmp_path)
        tasks[name] = TaskManager(include_defaults=False).load([str(tmp_path / "rte.yaml")])["tasks"]["rte"]
    assert len(tasks["tsv"].eval_docs) == len(tasks["parquet"].eval_docs) == RECORDS["rte"]
    assert _requests(tasks["tsv"]) == _requests(tasks["parquet"])


# ------------------------------------------------------------ bad input

@pytest.mark.parametrize(("name", "suggestion"), [("boolqq", "boolq"), ("hellaswg", "hellaswag"),
                                                   ("wikitext-2", "wikitext2"), ("arc_chalenge", "arc_challenge")])
def test_unknown_task_suggests_close_names(name, suggestion):
    with pytest.raises(BadInput, match=f"unknown task '{name}': did you mean .*{suggestion}") as error:
        validate_tasks(["wikitext2", name], data_dir=DATA_DIR)
    assert "\n" not in str(error.value)


def test_unknown_task_lists_each_suggestion_once():
    with pytest.raises(BadInput) as error:
        validate_tasks(["boolqq"])
    # boolq is both a bundle task and an lm-eval task: named once (lm-eval 0.4.13's task list)
    assert str(error.value) == "unknown task 'boolqq': did you mean boolq, boolqa_bn or boolq-seq2seq?"


def test_missing_local_file_is_named_before_any_model_work(tmp_path):
    with pytest.raises(BadInput, match=r"boolq needs .*boolq/boolq\.jsonl, which is missing: point --data-dir"):
        validate_tasks(["boolq"], data_dir=tmp_path)
    with pytest.raises(BadInput, match=r"rte needs .*rte/validation\.parquet or .*rte/dev\.tsv"):
        validate_tasks(["rte"], data_dir=tmp_path)
    assert validate_tasks(["wikitext2", "boolq", "ppl:x.txt", "boolq"], data_dir=DATA_DIR) == (
        ["wikitext2", "ppl:x.txt"], ["boolq"])


def test_offline_without_data_dir_names_the_file_and_data_dir(tiny, offline):
    model, tokenizer = tiny
    with pytest.raises(BadInput, match=r"pass --data-dir DIR with DIR/boolq/boolq\.jsonl"):
        evaluate(model, tokenizer, ["boolq"], limit=1)


def test_local_records_have_the_documented_layout():
    """SOURCES.md's layouts, which the bundle templates rely on (e.g. boolq's query[9:] strips "Passage: ")."""
    def first(path):
        with (DATA_DIR / path).open(encoding="utf-8") as handle:
            return json.loads(handle.readline())

    assert first("boolq/boolq.jsonl")["query"].startswith("Passage: ")
    assert first("arc_easy/arc_easy.jsonl")["query"].startswith("Question: ")
    assert first("piqa/piqa.jsonl")["query"].endswith("\n")
    assert set(first("winogrande/winogrande.jsonl")) == {"context_options", "continuation", "gold"}


# ------------------------------------------------------------ BOS rule, progress, quiet lm-eval

def _first_tokens_of_every_forward(model, run) -> set[int]:
    """The first token id of every row the model is run on during `run()` (lm-eval pads on the right)."""
    seen = set()

    def record(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        seen.update(input_ids[:, 0].tolist())

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize(("bos", "add_bos_token", "prepends"), [("auto", None, True), ("yes", True, True),
                                                              ("no", False, False)])
def test_bos_rule_reaches_every_zero_shot_request_and_is_recorded(tiny, offline, bos, add_bos_token, prepends):
    model, tokenizer = tiny
    assert tokenizer("Question:").input_ids[0] == tokenizer.bos_token_id  # the shipped tokenizer adds BOS
    outputs = []
    first = _first_tokens_of_every_forward(model, lambda: outputs.append(
        evaluate(model, tokenizer, ["boolq", "arc_easy"], limit=3, data_dir=DATA_DIR, bos=bos)))
    assert outputs[0]["bos"] == {"rule": bos, "lm_eval_add_bos_token": add_bos_token, "prepends_bos": prepends}
    if prepends:
        assert first == {tokenizer.bos_token_id}  # every request starts with BOS
    else:
        assert tokenizer.bos_token_id not in first and len(first) >= 2  # none does (the papers' harness)


def test_progress_reports_windows_then_tasks(tiny, offline):
    model, tokenizer = tiny
    events = []
    evaluate(model, tokenizer, ["wikitext2", "boolq", "rte"], seqlen=64, limit=3, data_dir=DATA_DIR, batch_size=2,
             on_progress=lambda done, total, label: events.append((done, total, label)))
    # within a task, its model requests (3 examples x 2 choices) as lm-eval runs them
    requests = {task: [(done, 6, f"zero-shot {task} requests") for done in range(7)] for task in ("boolq", "rte")}
    assert events == [(0, 3, "wikitext2 windows"), (2, 3, "wikitext2 windows"), (3, 3, "wikitext2 windows"),
                      (0, 2, "zero-shot boolq"), *requests["boolq"], (1, 2, "zero-shot rte"), *requests["rte"],
                      (2, 2, "zero-shot rte")]


@pytest.mark.parametrize("verbose", [False, True])
def test_lm_eval_noise_is_quiet_unless_verbose(tiny, offline, tmp_path, monkeypatch, capfd, caplog, verbose):
    monkeypatch.chdir(tmp_path)  # not a git repository: lm-eval's `git describe` complains here
    model, tokenizer = tiny
    capfd.readouterr()
    caplog.clear()
    run_zeroshot(model, tokenizer, ["boolq"], data_dir=DATA_DIR, limit=2, verbose=verbose)
    captured = capfd.readouterr()
    noise = captured.out + captured.err + caplog.text  # pytest takes the log records (the console otherwise)
    markers = ("`pretrained` model kwarg", "fatal: not a git repository", "it/s]")
    assert [marker in noise for marker in markers] == [verbose] * 3

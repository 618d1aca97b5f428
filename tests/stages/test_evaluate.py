"""The eval stage: results.json has one layout for one model and for several; model k/N progress."""

import json

import pytest
from conftest import SOME_DATA

from spp_cli.errors import BadInput
from spp_cli.report import read_stages
from spp_cli.stages.evaluate import evaluate_models, results_entries

TASKS = ["ppl:builtin:python-docs:test", "boolq"]
TOP_KEYS = {"schema_version", "models", "config", "notes", "fingerprint"}
ENTRY_KEYS = {"results", "perplexity", "mean_acc_7", "n-samples", "task_versions", "sources", "bos", "notes", "applied",
              "model", "config", "versions", "seconds"}


def run(models: dict, out, **options) -> dict:
    evaluate_models(models, TASKS, out, seqlen=64, limit=2, data_dir=str(SOME_DATA), device="cpu", **options)
    return json.loads(out.read_text())


def test_one_model_file_has_the_layout_of_a_many_model_file(tmp_path, tiny_llama_dir):
    one = run({"dense": "builtin:tiny-llama"}, tmp_path / "one" / "results.json", bos="no")
    two = run({"dense": "builtin:tiny-llama", "again": str(tiny_llama_dir)}, tmp_path / "two" / "results.json")
    assert set(one) == set(two) == TOP_KEYS and one["schema_version"] == two["schema_version"] == 1
    assert list(one["models"]) == ["dense"] and list(two["models"]) == ["dense", "again"]
    for entry in (*one["models"].values(), *two["models"].values()):
        assert set(entry) == ENTRY_KEYS
    assert one["models"]["dense"]["bos"]["rule"] == one["config"]["bos"] == "no"
    assert two["models"]["again"]["bos"] == {"rule": "auto", "lm_eval_add_bos_token": None, "prepends_bos": True}
    # the same weights give the same numbers whichever way the model is named
    assert two["models"]["dense"]["results"] == two["models"]["again"]["results"]
    assert one["models"]["dense"]["sources"]["boolq"]["task_file"] == "spp_cli/eval/tasks/boolq.yaml"
    assert results_entries(one) == one["models"]
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "results.json").write_text(json.dumps(two))
    assert list(read_stages(tmp_path / "run")[1]) == ["dense", "again"]  # `spp report` reads the same layout


def test_progress_says_model_k_of_n_and_prefixes_the_inner_events(tmp_path):
    events = []
    evaluate_models({"a": "builtin:tiny-llama", "b": "builtin:tiny-llama"}, ["ppl:builtin:python-docs:test"],
                    tmp_path / "results.json", seqlen=64, limit=2, device="cpu", batch_size=2,
                    on_event=events.append)
    assert [event.kind for event in events[:1]] == ["plan"]  # the memory plan first (tests/test_memory_plan.py)
    events = events[1:]
    assert {(event.stage, event.kind) for event in events} == {("eval", "progress")}
    assert [(e.payload["done"], e.payload["total"], e.payload["label"]) for e in events] == [
        (0, 2, "model 1/2 a"), (0, 2, "model 1/2 a · ppl:builtin:python-docs:test windows"),
        (2, 2, "model 1/2 a · ppl:builtin:python-docs:test windows"),
        (1, 2, "model 2/2 b"), (0, 2, "model 2/2 b · ppl:builtin:python-docs:test windows"),
        (2, 2, "model 2/2 b · ppl:builtin:python-docs:test windows"),
    ]


def test_a_flat_results_file_from_an_older_spp_is_named(tmp_path):
    with pytest.raises(BadInput, match=r"old\.json has no \"models\" object .*rerun spp eval"):
        results_entries({"results": {}, "perplexity": {}}, "old.json")
    with pytest.raises(BadInput, match="bos: 'maybe' is not one of auto, yes, no"):
        evaluate_models({"a": "builtin:tiny-llama"}, ["wikitext2"], tmp_path / "r.json", bos="maybe")

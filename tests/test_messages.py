"""Poor messages from the newcomer trial (issue 25, item 6), each now one line naming the problem and the fix."""

import json

import pytest
from conftest import run_spp
from tiny_models import save_random_model

from spp_cli.data.formats import normalize_records
from spp_cli.errors import BadInput

ALPACA_RECORD = {"instruction": "Say hi.", "input": "", "output": "hi"}


def test_verify_against_a_model_of_another_architecture_names_it_not_an_incomplete_checkpoint(tmp_path, capsys):
    from stages.test_verify import save_two_four

    save_two_four(tmp_path / "pruned")  # a LLaMA: model.layers.*
    save_random_model(tmp_path / "opt", "opt")  # OPT: model.decoder.layers.*
    capsys.readouterr()  # transformers' saving bars
    code, _, err = run_spp(["verify", tmp_path / "pruned", "--against", tmp_path / "opt"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "incomplete" not in err
    assert f"--against '{tmp_path / 'opt'}' has no layer 'model.layers.0.self_attn.q_proj'" in err
    assert "model.decoder.layers.0." in err and "give that model's directory" in err


@pytest.mark.parametrize("stage_file, what", [("spp.json", "a model folder"), ("results.json", "an eval result")])
def test_report_on_a_stage_folder_says_it_is_not_a_run_folder(tmp_path, capsys, stage_file, what):
    (tmp_path / "run" / "prune").mkdir(parents=True)
    (tmp_path / "run" / "run.json").write_text(json.dumps({"stages": [{"name": "prune"}]}))
    (tmp_path / "run" / "prune" / stage_file).write_text("{}")
    code, _, err = run_spp(["report", tmp_path / "run" / "prune"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "holds no stage output" not in err
    assert f"is {what}" in err and "not a run folder" in err and f"its parent '{tmp_path / 'run'}'" in err


@pytest.mark.parametrize(
    "data_format, record, fix",
    [
        ("chat", ALPACA_RECORD, "'instruction' is a field of alpaca records: use --data-format alpaca (or auto)"),
        ("alpaca", {"messages": [{"role": "user", "content": "hi"}]},
         "'messages' is a field of chat records: use --data-format chat (or auto)"),
    ],
)
def test_records_of_another_format_suggest_that_format(data_format, record, fix):
    with pytest.raises(BadInput) as error:
        normalize_records([record], data_format)
    assert fix in str(error.value) and "remove" not in str(error.value)


@pytest.mark.parametrize(
    "value, kind",
    [(5, "an integer"), (1.5, "a number"), (True, "a boolean"), ([1], "a list"), ({"a": 1}, "an object"),
     (None, "null")],
)
def test_a_wrong_type_is_named_with_its_json_kind(value, kind):
    with pytest.raises(BadInput, match=f"'text' is {kind}, not a string"):
        normalize_records([{"text": value}], "text")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune", "m", "--method", "foo", "--out", "o"],
         "spp: error: Invalid value for '--method': 'foo' is not one of 'magnitude', 'wanda', 'sparsegpt' "
         "(see 'spp prune --help')"),
        (["env", "--format", "xml"],
         "spp: error: Invalid value for '--format': 'xml' is not one of 'human', 'json' (see 'spp env --help')"),
    ],
)
def test_choice_errors_have_no_value_error_prefix(argv, message, capsys):
    code, _, err = run_spp(argv, capsys)
    assert code == 2 and err == message + "\n"

"""Training records -> examples: the Alpaca template wins over a record's `text`, data_format, strict records."""

import json
import re

import pytest
from conftest import TEST_DATA
from tiny_models import tiny_tokenizer

from spp_cli.data.examples import IGNORE_INDEX, alpaca_prompt, build_examples
from spp_cli.data.formats import normalize_records
from spp_cli.data.sources import read_records
from spp_cli.errors import BadInput

# the exact bytes of alpaca-lora's templates/alpaca.json (SPP's finetune.py), written out here on purpose
TEMPLATE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
)
TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName a color.\n\n### Response:\n"
)


def hub_style_records() -> list[dict]:
    """Records as tatsu-lab/alpaca and vicgalle/alpaca-gpt4 ship them: instruction fields AND a `text` copy."""
    with_input = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    no_input = {"instruction": "Name a color.", "input": "", "output": "Blue"}
    for record in (with_input, no_input):
        record["text"] = alpaca_prompt(record["instruction"], record["input"]) + record["output"]
    return [with_input, no_input]


def test_records_with_text_and_instruction_fields_are_one_templated_example_each():
    tokenizer = tiny_tokenizer()
    records = hub_style_records()
    plain, masked = (build_examples(tokenizer, records, 512, mask_prompt=mask) for mask in (False, True))
    assert len(plain) == len(masked) == len(records)  # one example per record, not packed windows
    for prompt, output, example, example_masked in zip(
        (TEMPLATE_INPUT, TEMPLATE_NO_INPUT), ("5", "Blue"), plain, masked, strict=True
    ):
        expected = tokenizer(prompt + output)["input_ids"] + [tokenizer.eos_token_id]
        assert example["input_ids"] == expected == example["labels"]
        assert tokenizer.decode(example["input_ids"], skip_special_tokens=True) == prompt + output
        prompt_len = len(tokenizer(prompt)["input_ids"])
        assert example_masked["input_ids"] == expected
        assert example_masked["labels"] == [IGNORE_INDEX] * prompt_len + expected[prompt_len:]


def test_data_format_text_packs_the_text_field_instead():
    tokenizer = tiny_tokenizer()
    records = hub_style_records()
    stream = sum((tokenizer(r["text"])["input_ids"] + [tokenizer.eos_token_id] for r in records), [])
    windows = build_examples(tokenizer, records, 16, data_format="text")
    assert [w["input_ids"] for w in windows] == [stream[i:i + 16] for i in range(0, len(stream) - 15, 16)]
    with pytest.raises(BadInput, match="mask_prompt needs prompt/response records, but training record 1 is"):
        build_examples(tokenizer, records, 16, mask_prompt=True, data_format="text")


def test_data_format_alpaca_refuses_plain_text_and_chat_refuses_alpaca():
    with pytest.raises(BadInput, match="training record 1 has no 'instruction', which the alpaca format needs"):
        normalize_records([{"text": "just text"}], "alpaca")
    with pytest.raises(BadInput, match=re.escape("training record 1 has an unknown key 'instruction' (chat format)")):
        normalize_records(hub_style_records(), "chat")
    with pytest.raises(BadInput, match="data_format 'json' is unknown: use one of auto, alpaca, chat, text"):
        normalize_records([], "json")


def test_mask_prompt_on_plain_text_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="training record 2 of corpus.jsonl is plain text"):
        normalize_records([{"instruction": "a", "output": "b"}, {"text": "doc"}], mask_prompt=True,
                          source="corpus.jsonl")


@pytest.mark.needs_data
def test_the_shipped_alpaca_subset_is_valid_and_canonical_records_are_a_fixed_point():
    records = read_records(str(TEST_DATA / "alpaca" / "alpaca_small.json"))
    canonical = normalize_records(records, mask_prompt=True)
    assert len(canonical) == 2000 and all(set(r) == {"instruction", "input", "output"} for r in canonical)
    assert normalize_records(canonical) == canonical
    c4 = [{"text": "a document", "url": "https://example.org", "timestamp": "2019-04-25 12:57:54"}]
    assert normalize_records(c4) == [{"text": "a document"}]  # C4's metadata keys are ignored


@pytest.mark.parametrize(
    "record, message",
    [
        ({"instruction": "Say hi.", "input": ""}, "training record 3 has no 'output', which the alpaca format needs"),
        ({"instruction": "Say hi.", "response": "hi"}, "unknown key 'response' (alpaca format): rename it to "
                                                      "'output'"),
        ({"instruction": "Say hi.", "output": "hi", "lang": "en"}, "unknown key 'lang' (alpaca format): remove "
                                                                  "it"),
        ({"instruction": "Say hi.", "output": ""}, "'output' is empty, so there is no response to learn"),
        ({"instruction": "Say hi.", "output": 5}, "'output' is an integer, not a string"),
        ({"instruction": "", "output": "hi"}, "'instruction' is empty"),
        ({"messages": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "hello"}]},
         "training record 3, message 1 has role 'human', not one of system, user, assistant: use 'user'"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]},
         "message 2 has role 'bot', not one of system, user, assistant: use 'assistant'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "training record 3 has no assistant message"),
        ({"messages": [{"role": "user", "text": "hi"}]}, "message 1 has an unknown key 'text' (chat message format)"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"conversations": [], "text": "x"}, "unknown key 'conversations' (text format): rename it to "
                                             "'messages'"),
        ({"prompt": "x"}, "training record 3 has none of text, instruction, messages"),
    ],
)
def test_broken_records_name_the_record_and_the_field(record, message):
    good = {"instruction": "Name a color.", "output": "Blue"}
    with pytest.raises(BadInput, match=re.escape(message)) as caught:
        normalize_records([good, good, record])
    assert "\n" not in str(caught.value)


def test_a_run_with_no_label_left_is_bad_input(tmp_path):
    tokenizer = tiny_tokenizer()
    records = [{"instruction": "Write a long story about a cat. " * 8, "output": "Fine."}]
    assert len(tokenizer(alpaca_prompt(records[0]["instruction"]))["input_ids"]) > 32
    with pytest.raises(BadInput, match="no label is left to train on: under mask_prompt every one of the 1 "):
        build_examples(tokenizer, records, 32, mask_prompt=True)
    assert len(build_examples(tokenizer, records, 32)) == 1  # without the mask the prompt itself is learned


def test_finetune_stage_refuses_broken_records_before_loading_the_model(tmp_path):
    from spp_cli.stages.finetune import finetune

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "response": "hi"}) + "\n")
    with pytest.raises(BadInput, match=f"training record 1 of {data} has an unknown key 'response'"):
        finetune("builtin:tiny-llama", tmp_path / "out", data=str(data), max_steps=1, device="cpu")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()

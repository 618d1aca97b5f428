"""Data sources: the builtin corpus, local files, calibration windows, and bad data."""

import json

import pytest
import torch

from spp_cli.data.builtin_corpus import build_python_docs, split_of
from spp_cli.data.sources import calibration_windows, read_records, read_texts, token_stream
from spp_cli.errors import BadInput


def test_builtin_corpus_is_identical_across_two_builds():
    first, second = build_python_docs(), build_python_docs()
    assert first.sha256 == second.sha256
    assert first.splits == second.splits
    sizes = {split: len(docs) for split, docs in first.splits.items()}
    assert sizes["train"] > 10 * sizes["test"] > 0  # about 90% / 5% / 5%
    assert sum(len(d) for d in first.splits["train"]) > 1_000_000  # characters


def test_split_assignment_is_a_stable_hash_of_the_name():
    assert split_of("json") == split_of("json")
    counts = {"train": 0, "validation": 0, "test": 0}
    for index in range(2000):
        counts[split_of(f"module{index}")] += 1
    assert 0.86 < counts["train"] / 2000 < 0.94


def test_builtin_source_reads_the_requested_split():
    import hashlib

    from spp_cli.data.builtin_corpus import load_python_docs

    test_texts = read_texts("builtin:python-docs:test")
    assert hashlib.sha256("\n\n".join(test_texts).encode()).hexdigest() == load_python_docs().sha256["test"]
    with pytest.raises(BadInput, match="unknown split 'dev'"):
        read_texts("builtin:python-docs:dev")
    with pytest.raises(BadInput, match="unknown builtin corpus 'nope'"):
        read_texts("builtin:nope")


def test_local_formats(tmp_path, test_data):
    alpaca = read_records(str(test_data / "alpaca" / "alpaca_small.json"))
    assert len(alpaca) == 2000 and {"instruction", "input", "output"} <= set(alpaca[0])
    c4 = read_texts(str(test_data / "c4" / "c4-train.00000-of-01024.first1000.jsonl"))
    assert len(c4) == 1000
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert read_texts(str(tmp_path / "chat.jsonl")) == ["hi"]
    (tmp_path / "plain.txt").write_text("one document\n")
    assert read_records(str(tmp_path / "plain.txt")) == [{"text": "one document\n"}]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", b"", "has no records"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', "bad.jsonl line 2: not valid JSON"),
        ("latin.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), "not UTF-8"),
        ("fields.jsonl", b'{"prompt": "a"}\n', "line 1: a record needs 'text'"),
        ("fields.json", b'[{"text": "a"}, {"prompt": "b"}]', "fields.json record 2: a record needs 'text'"),
        ("object.json", b'{"a": 1, "b": 2}', "expected a JSON list of records"),
    ],
)
def test_bad_local_data_names_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadInput, match=message):
        read_records(str(path))


def test_offline_dataset_names_point_to_local_alternatives(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(BadInput, match="offline: use a local C4 slice"):
        read_records("c4")


class CharacterTokenizer:
    """A stand-in exposing only what calibration needs: one id per character, a BOS first."""

    def __call__(self, text):
        return type("Encoding", (), {"input_ids": [1] + [ord(c) % 250 + 2 for c in text]})()


def test_calibration_windows_follow_the_reference_sampler(tmp_path):
    documents = [f"document {i} " + "x" * (30 + 7 * i) for i in range(20)]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    windows = calibration_windows(CharacterTokenizer(), str(source), nsamples=5, seqlen=40, seed=3)
    assert windows.shape == (5, 40)

    # the same draws written out as in SparseGPT's get_c4: random doc, retry until > seqlen, random start
    import random

    random.seed(3)
    tokenizer, expected = CharacterTokenizer(), []
    for _ in range(5):
        while True:
            ids = tokenizer(documents[random.randint(0, len(documents) - 1)]).input_ids
            if len(ids) > 40:
                break
        start = random.randint(0, len(ids) - 40 - 1)
        expected.append(ids[start : start + 40])
    assert torch.equal(windows, torch.tensor(expected))
    assert torch.equal(windows, calibration_windows(CharacterTokenizer(), str(source), 5, 40, seed=3))


def test_short_documents_are_concatenated_and_too_little_text_is_bad_input(tmp_path):
    source = tmp_path / "short.jsonl"
    source.write_text("".join(json.dumps({"text": "abc" * 3}) + "\n" for _ in range(10)))
    windows = calibration_windows(CharacterTokenizer(), str(source), nsamples=3, seqlen=30, seed=0)
    assert windows.shape == (3, 30)
    with pytest.raises(BadInput, match="fewer than one window of 500"):
        calibration_windows(CharacterTokenizer(), str(source), nsamples=3, seqlen=500, seed=0)
    with pytest.raises(BadInput, match="nsamples 0 is invalid"):
        calibration_windows(CharacterTokenizer(), str(source), nsamples=0, seqlen=30, seed=0)


def test_token_stream_tokenizes_once_with_one_bos():
    stream = token_stream(CharacterTokenizer(), ["ab", "cd"])
    assert stream.shape == (1, 7) and stream[0, 0] == 1 and (stream[0, 1:] != 1).all()

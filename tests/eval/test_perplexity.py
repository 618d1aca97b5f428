"""Token perplexity (spec/pruners.md §3) against an independent computation, and the WikiText-2 window count.

The model is the shipped `builtin:tiny-llama`; the pinned window count uses the tests' own tokenizer
(tiny_models.tiny_tokenizer), which is deterministic. WikiText-2 comes from the public data, or its committed cut.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SOME_DATA, TEST_DATA
from tiny_models import tiny_tokenizer

from spp_cli.data.sources import read_texts
from spp_cli.errors import BadInput
from spp_cli.eval.engine import evaluate
from spp_cli.eval.perplexity import PROTOCOL, perplexity_stream, token_perplexity
from spp_cli.io.checkpoint import BUILTIN_MODELS, resolve_seqlen
from spp_cli.render import metric_columns

# len(tiny_tokenizer()("\n\n".join(wikitext-2 test rows)).input_ids), BOS included.
WIKITEXT2_TEST_TOKENS = 893279


def tiny_model_and_tokenizer():
    """builtin:tiny-llama in fp32, eval mode, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = BUILTIN_MODELS["tiny-llama"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer()


def reference_perplexity(model, stream: torch.Tensor, seqlen: int) -> float:
    """Independent formula: exp of the mean, over windows, of each window's mean next-token NLL (float64)."""
    nsamples = stream.shape[1] // seqlen
    window_means = []
    with torch.no_grad():
        for i in range(nsamples):
            window = stream[:, i * seqlen : (i + 1) * seqlen]
            log_probs = torch.log_softmax(model(window).logits[0, :-1].double(), dim=-1)  # [seqlen-1, vocab]
            window_means.append(-log_probs.gather(1, window[0, 1:, None]).mean().item())
    return math.exp(sum(window_means) / nsamples)


def test_token_perplexity_equals_independent_computation(tiny):
    model, _ = tiny
    seqlen = 32
    torch.manual_seed(1)
    stream = torch.randint(0, model.config.vocab_size, (1, 5 * seqlen + 7))
    result = token_perplexity(model, stream, seqlen)
    assert result["windows"] == 5 and result["seqlen"] == seqlen
    assert result["tokens"] == 5 * seqlen and result["stream_tokens"] == 5 * seqlen + 7  # the tail is not scored
    assert result["protocol"] == PROTOCOL == "token, non-overlapping windows"
    assert result["value"] == pytest.approx(reference_perplexity(model, stream, seqlen), rel=1e-5)


def test_token_perplexity_does_not_depend_on_batch_size_or_tail(tiny):
    model, _ = tiny
    seqlen = 32
    torch.manual_seed(2)
    stream = torch.randint(0, model.config.vocab_size, (1, 5 * seqlen + 9))
    values = [token_perplexity(model, stream, seqlen, batch_size=b)["value"] for b in (1, 2, 3, 5, 8)]
    assert max(values) == pytest.approx(min(values), rel=1e-6)
    other_tail = stream.clone()
    other_tail[0, 5 * seqlen :] = 0  # the dropped tail must not matter
    assert token_perplexity(model, other_tail, seqlen)["value"] == pytest.approx(values[0], rel=1e-6)
    first_two = token_perplexity(model, stream, seqlen, max_windows=2)
    assert first_two["windows"] == 2
    assert first_two["value"] == pytest.approx(reference_perplexity(model, stream[:, : 2 * seqlen], seqlen), rel=1e-5)


@pytest.mark.needs_data
def test_wikitext2_stream_is_tokenized_once_with_the_pinned_window_count():
    tokenizer = tiny_tokenizer()
    rows = [json.loads(line)["text"] for line in (TEST_DATA / "wikitext-2-raw-v1" / "test.jsonl").open()]
    assert len(rows) == 4358
    expected_tokens = len(tokenizer("\n\n".join(rows)).input_ids)
    stream, source = perplexity_stream("wikitext2", tokenizer, 2048, TEST_DATA)
    assert source.endswith("wikitext-2-raw-v1/test.jsonl")
    assert stream.shape == (1, expected_tokens) == (1, WIKITEXT2_TEST_TOKENS)
    assert stream[0, 0] == tokenizer.bos_token_id and int((stream == tokenizer.bos_token_id).sum()) == 1
    for seqlen, windows in ((2048, 436), (1024, 872), (128, 6978)):
        assert stream.shape[1] // seqlen == expected_tokens // seqlen == windows


def test_evaluate_wikitext2_offline_result_layout(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = tiny
    result = evaluate(model, tokenizer, ["wikitext2"], seqlen=128, limit=3, data_dir=SOME_DATA, batch_size=2)
    entry = result["perplexity"]["wikitext2"]
    assert entry["windows"] == 3 and entry["seqlen"] == 128 and entry["limit"] == 3
    assert entry["source"] == str(SOME_DATA / "wikitext-2-raw-v1" / "test.jsonl")
    # the first 3 windows come from the start of the text: tokenizing its first 40 rows gives the same tokens
    rows = [json.loads(line)["text"] for line in (SOME_DATA / "wikitext-2-raw-v1" / "test.jsonl").open()]
    head = tokenizer("\n\n".join(rows[:40]), return_tensors="pt").input_ids[:, : 3 * 128]
    assert head.shape[1] == 3 * 128
    assert entry["value"] == pytest.approx(reference_perplexity(model, head, 128), rel=1e-5)
    assert result["results"] == {} and result["mean_acc_7"] is None and len(result["notes"]) == 1


def test_seqlen_default_and_limits(tiny):
    model, _ = tiny
    positions = model.config.max_position_embeddings
    assert resolve_seqlen(model.config, None) == min(2048, positions)
    assert resolve_seqlen(model.config, 64) == 64
    with pytest.raises(BadInput, match=f"exceeds the model's {positions} positions"):
        resolve_seqlen(model.config, positions + 1)
    with pytest.raises(BadInput, match="fewer than one window of seqlen 64"):
        token_perplexity(model, torch.zeros(1, 63, dtype=torch.long), 64)


def test_missing_data_is_bad_input_naming_the_file(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    with pytest.raises(BadInput, match=r"wikitext2 needs .*wikitext-2-raw-v1/test\.jsonl.*--data-dir"):
        evaluate(model, tokenizer, ["wikitext2"], data_dir=tmp_path)
    with pytest.raises(BadInput, match=r"c4 needs .*c4/c4-validation\.00000-of-00008\.json\.gz"):
        evaluate(model, tokenizer, ["c4"], data_dir=SOME_DATA)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for task in ("wikitext2", "c4"):
        with pytest.raises(BadInput, match="offline mode is set: pass --data-dir DIR with DIR/"):
            evaluate(model, tokenizer, [task])


def test_ppl_source_joins_documents_and_tokenizes_once(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "docs.jsonl"
    documents = [" ".join(["The quick brown fox jumps over the lazy dog."] * 20)] * 4
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents), encoding="utf-8")
    result = evaluate(model, tokenizer, [f"ppl:{path}"], seqlen=64)
    stream = tokenizer("\n\n".join(read_texts(str(path))), return_tensors="pt").input_ids
    entry = result["perplexity"][f"ppl:{path}"]
    assert entry["stream_tokens"] == stream.shape[1] and entry["windows"] == stream.shape[1] // 64
    assert entry["tokens"] == entry["windows"] * 64
    assert entry["value"] == pytest.approx(reference_perplexity(model, stream, 64), rel=1e-5)


def test_metric_labels_show_protocol_and_seqlen():
    """The column titles the console and report.md print (render.metric_columns) for each kind of metric."""
    entries = {
        "dense": {"perplexity": {"wikitext2": {"value": 6.4, "seqlen": 2048},
                                 "ppl:builtin:python-docs:test": {"value": 9.1, "seqlen": 256}},
                  "results": {"wikitext": {"word_perplexity,none": 20.5}, "boolq": {"acc,none": 0.62}},
                  "mean_acc_7": 0.5},
        "pruned": {"perplexity": {"ppl:/data/notes.jsonl": {"value": 12.0, "seqlen": 128}}},
    }
    assert [title for title, _, _ in metric_columns(entries)] == [
        "wikitext2 token ppl @2048", "python-docs:test token ppl @256", "notes.jsonl token ppl @128",
        "wikitext word_perplexity", "boolq acc", "mean acc (7 tasks)"]


def test_tokens_under_a_limit_are_the_tokens_scored_not_the_stream(tiny, tmp_path):
    """results.json said "tokens": 500398 (the whole stream) for --limit 20 at seqlen 256: it is 20 x 256."""
    model, tokenizer = tiny
    path = tmp_path / "docs.jsonl"
    documents = [" ".join(["The quick brown fox jumps over the lazy dog."] * 20)] * 4
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents), encoding="utf-8")
    entry = evaluate(model, tokenizer, [f"ppl:{path}"], seqlen=32, limit=3)["perplexity"][f"ppl:{path}"]
    assert entry["windows"] == 3 and entry["limit"] == 3
    assert entry["tokens"] == 3 * 32 and entry["stream_tokens"] > 10 * 32

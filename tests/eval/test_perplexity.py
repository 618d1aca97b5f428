"""Token perplexity (spec/pruners.md §3) against an independent computation, and the WikiText-2 window count.

The tiny model is `builtin:tiny-llama` (spp_cli/assets/tiny-llama) when it exists, else a random LlamaForCausalLM
(hidden 64, 2 layers) with a byte-level BPE tokenizer (vocab 512) trained here on 20 KB of WikiText-2 validation
text; the pinned window count always uses that trained tokenizer, which is deterministic.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, TEST_DATA

from spp_cli.errors import BadInput
from spp_cli.eval.engine import evaluate, format_metric_label
from spp_cli.eval.perplexity import PROTOCOL, perplexity_stream, token_perplexity
from spp_cli.io.checkpoint import resolve_seqlen

DATA_DIR = TEST_DATA
TINY_LLAMA = REPO / "spp_cli" / "assets" / "tiny-llama"
# len(tokenizer("\n\n".join(wikitext-2 test rows)).input_ids) for fixture_tokenizer(), BOS included.
WIKITEXT2_TEST_TOKENS_FIXTURE = 672979


def fixture_tokenizer():
    """Byte-level BPE (vocab 512, BOS <s> prepended like LLaMA's) trained on the first 20 KB of wiki.valid.raw."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = (DATA_DIR / "wikitext-2-raw-v1" / "wiki.valid.raw").read_text(encoding="utf-8")[:20000]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([text], trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def tiny_model_and_tokenizer():
    """builtin:tiny-llama if shipped, else a random 2-layer LLaMA (hidden 64) with fixture_tokenizer()."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (TINY_LLAMA / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(TINY_LLAMA)
    tokenizer = fixture_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


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
    assert result["windows"] == 5 and result["seqlen"] == seqlen and result["tokens"] == 5 * seqlen + 7
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


def test_wikitext2_stream_is_tokenized_once_with_the_pinned_window_count():
    tokenizer = fixture_tokenizer()
    rows = [json.loads(line)["text"] for line in (DATA_DIR / "wikitext-2-raw-v1" / "test.jsonl").open()]
    assert len(rows) == 4358
    expected_tokens = len(tokenizer("\n\n".join(rows)).input_ids)
    stream, source = perplexity_stream("wikitext2", tokenizer, 2048, DATA_DIR)
    assert source.endswith("wikitext-2-raw-v1/test.jsonl")
    assert stream.shape == (1, expected_tokens) == (1, WIKITEXT2_TEST_TOKENS_FIXTURE)
    assert stream[0, 0] == tokenizer.bos_token_id and int((stream == tokenizer.bos_token_id).sum()) == 1
    for seqlen, windows in ((2048, 328), (1024, 657), (128, 5257)):
        assert stream.shape[1] // seqlen == expected_tokens // seqlen == windows


def test_evaluate_wikitext2_offline_result_layout(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = tiny
    result = evaluate(model, tokenizer, ["wikitext2"], seqlen=128, limit=3, data_dir=DATA_DIR, batch_size=2)
    entry = result["perplexity"]["wikitext2"]
    assert entry["windows"] == 3 and entry["seqlen"] == 128 and entry["limit"] == 3
    assert entry["source"] == str(DATA_DIR / "wikitext-2-raw-v1" / "test.jsonl")
    # the first 3 windows come from the start of the text: tokenizing its first 100 rows gives the same tokens
    rows = [json.loads(line)["text"] for line in (DATA_DIR / "wikitext-2-raw-v1" / "test.jsonl").open()]
    head = tokenizer("\n\n".join(rows[:100]), return_tensors="pt").input_ids[:, : 3 * 128]
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
        evaluate(model, tokenizer, ["c4"], data_dir=DATA_DIR)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for task in ("wikitext2", "c4"):
        with pytest.raises(BadInput, match="offline mode is set: pass --data-dir DIR with DIR/"):
            evaluate(model, tokenizer, [task])


def test_ppl_source_joins_documents_and_tokenizes_once(tiny, tmp_path):
    data = pytest.importorskip("spp_cli.data.sources")
    model, tokenizer = tiny
    path = tmp_path / "docs.jsonl"
    documents = [" ".join(["The quick brown fox jumps over the lazy dog."] * 20)] * 4
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents), encoding="utf-8")
    result = evaluate(model, tokenizer, [f"ppl:{path}"], seqlen=64)
    stream = tokenizer("\n\n".join(data.read_texts(str(path))), return_tensors="pt").input_ids
    entry = result["perplexity"][f"ppl:{path}"]
    assert entry["tokens"] == stream.shape[1] and entry["windows"] == stream.shape[1] // 64
    assert entry["value"] == pytest.approx(reference_perplexity(model, stream, 64), rel=1e-5)


def test_metric_labels_show_protocol_and_seqlen():
    assert format_metric_label("wikitext2", 2048) == "wikitext2 token ppl @2048"
    assert format_metric_label("ppl:builtin:python-docs:test", 256) == "ppl:builtin:python-docs:test token ppl @256"
    assert format_metric_label("wikitext") == "wikitext word ppl (lm-eval)"
    assert format_metric_label("boolq") == "boolq acc"

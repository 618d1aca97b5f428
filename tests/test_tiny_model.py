"""The shipped tiny model: loads with plain transformers offline, and its card's perplexity is what it scores."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spp_cli.data.builtin_corpus import load_python_docs
from spp_cli.data.sources import token_stream
from spp_cli.eval.perplexity import token_perplexity
from spp_cli.io.checkpoint import BUILTIN_MODELS

CARD = json.loads((BUILTIN_MODELS["tiny-llama"] / "training.json").read_text())


@pytest.fixture(scope="module")
def card():
    return CARD


def test_loads_with_plain_transformers_and_is_genuinely_trained(tiny_llama_dir, card):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert model.config.hidden_size >= 128 and model.config.num_hidden_layers >= 4
    assert next(model.parameters()).dtype == torch.float16  # shipped in fp16
    assert tokenizer("def")["input_ids"][0] == tokenizer.bos_token_id
    size = sum(path.stat().st_size for path in tiny_llama_dir.iterdir())
    assert size <= 10_000_000
    dense = card["perplexity"]["dense"]["test"]
    assert dense < len(tokenizer) / 20  # far below the vocabulary size
    assert card["perplexity"]["magnitude 70%"]["test"] > 1.3 * dense  # pruning damage shows on it


# The validation split is built from the running Python's stdlib docstrings, so on another Python the text differs.
# Measured with this model against the card (3.11.7): the split built by Python 3.10.13 scores +1.1%, 3.12.1 +5.3%,
# 3.13.0 +7.8%. 15% leaves room for later stdlibs and stays far below the damage the card records for magnitude
# 2:4 (+37%), so a broken model, tokenizer or perplexity still fails on any Python.
OTHER_CORPUS_TOLERANCE = 0.15


def test_held_out_perplexity_matches_the_model_card(tiny_llama_dir, card):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    corpus = load_python_docs()
    same_corpus = corpus.sha256["validation"] == card["corpus_sha256"]["validation"]  # the card's Python
    stream = token_stream(tokenizer, corpus.documents("validation"))
    result = token_perplexity(model, stream, seqlen=256, batch_size=8)
    tolerance = 1e-4 if same_corpus else OTHER_CORPUS_TOLERANCE  # 1e-4: the same text, only summation order
    assert math.isclose(result["value"], card["perplexity"]["dense"]["validation"], rel_tol=tolerance)

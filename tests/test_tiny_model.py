"""The shipped tiny model: loads with plain transformers offline, and its card's perplexity is what it scores."""

import json
import math
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spp_cli.data.sources import read_texts, token_stream
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


@pytest.mark.skipif(
    sys.version.split()[0] != CARD["python_version"],
    reason="the corpus (and so the card's numbers) depends on the Python version the card names",
)
def test_held_out_perplexity_matches_the_model_card(tiny_llama_dir, card):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    stream = token_stream(tokenizer, read_texts("builtin:python-docs:validation"))
    result = token_perplexity(model, stream, seqlen=256, batch_size=8)
    assert math.isclose(result["value"], card["perplexity"]["dense"]["validation"], rel_tol=1e-4)

"""Shared test set-up: offline, real data from $SPP_TEST_DATA, the shipped tiny model."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(os.environ.get("SPP_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def test_data() -> Path:
    assert TEST_DATA.is_dir(), f"test data not found at {TEST_DATA}: set SPP_TEST_DATA"
    return TEST_DATA


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    from spp_cli.io.checkpoint import BUILTIN_MODELS

    return BUILTIN_MODELS["tiny-llama"]


def run_spp(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from spp_cli.cli import run_cli

    code = run_cli([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def make_tokenizer(vocab_size: int = 256):
    """A small byte-level BPE tokenizer trained in a blink on a fixed text (BOS prepended, like LLaMA's)."""
    from spp_cli.data.bpe import train_byte_level_bpe

    text = ["The quick brown fox jumps over the lazy dog. " * 4, "def function(argument): return value\n" * 4]
    return train_byte_level_bpe(text, vocab_size)


def make_llama(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 320, dtype=None):
    """A random-init tiny LLaMA (hidden 64, 2 blocks) built from a config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    return model.to(dtype) if dtype is not None else model


@pytest.fixture
def random_model_dir(tmp_path):
    """A saved random tiny LLaMA (fp32 safetensors + tokenizer): a stand-in user checkpoint."""
    directory = tmp_path / "random-llama"
    make_llama().save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory

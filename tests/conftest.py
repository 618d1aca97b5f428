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
    from spp_cli.checkpoint import BUILTIN_MODELS

    return BUILTIN_MODELS["tiny-llama"]


def run_spp(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from spp_cli.cli import run_cli

    code = run_cli([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err

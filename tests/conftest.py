"""Shared test set-up: offline, the public data from $SPP_TEST_DATA (or its committed cut), the shipped tiny model.

Data: a test that needs the full public data (../shared/data, or $SPP_TEST_DATA) takes the `test_data` fixture
or the `needs_data` marker; without the data it skips with one line naming the folder, and with
SPP_REQUIRE_TEST_DATA=1 (CI) that skip is a failure. A test that only needs a few records takes `some_data`
(or SOME_DATA): the full data when present, else tests/fixtures/data, the same layout cut to a few KB by
scripts/make_test_fixtures.py.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(os.environ.get("SPP_TEST_DATA", REPO.parent / "shared" / "data"))
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"
# the files the suite reads; a folder without one of them is not the public data
DATA_FILES = [path.relative_to(FIXTURE_DATA) for path in FIXTURE_DATA.rglob("*")
              if path.is_file() and path.name != "SOURCES.md"]
HAVE_DATA = all((TEST_DATA / relative).is_file() for relative in DATA_FILES)
SOME_DATA = TEST_DATA if HAVE_DATA else FIXTURE_DATA
MISSING_DATA = (f"public test data not found at {TEST_DATA}: set SPP_TEST_DATA to a folder laid out like "
                "../shared/data (see README)")


def require_test_data() -> Path:
    """The full public data; skips the test without it (fails instead under SPP_REQUIRE_TEST_DATA=1)."""
    if not HAVE_DATA:
        if os.environ.get("SPP_REQUIRE_TEST_DATA") == "1":
            pytest.fail(MISSING_DATA, pytrace=False)
        pytest.skip(MISSING_DATA)
    return TEST_DATA


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_data"):
        require_test_data()


@pytest.fixture(scope="session")
def test_data() -> Path:
    return require_test_data()


@pytest.fixture(scope="session")
def some_data() -> Path:
    return SOME_DATA


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


@pytest.fixture
def random_model_dir(tmp_path):
    """A saved random tiny LLaMA (fp32 safetensors + tokenizer): a stand-in user checkpoint."""
    from tiny_models import save_random_model

    return save_random_model(tmp_path / "random-llama")

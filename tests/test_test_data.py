"""The suite's data rule (tests/conftest.py): without the public data a test that needs it skips with one line
naming the folder and SPP_TEST_DATA, SPP_REQUIRE_TEST_DATA=1 (CI) makes that a failure, and the rest runs on the
committed cut in tests/fixtures/data."""

import json
import os
import subprocess
import sys

from conftest import DATA_FILES, FIXTURE_DATA, REPO

PROBE = '''
import pytest


def test_reads_the_data(test_data):
    assert test_data.is_dir()


@pytest.mark.needs_data
def test_marked():
    pass


def test_runs_on_the_cut(some_data):
    assert some_data == FIXTURE_DATA
'''


def run_probe(tmp_path, **env) -> subprocess.CompletedProcess:
    """pytest on a three-test file with this suite's conftest as a plugin, the public data pointed at an empty dir."""
    (tmp_path / "test_probe.py").write_text(f"from pathlib import Path\nFIXTURE_DATA = Path({str(FIXTURE_DATA)!r})\n"
                                            + PROBE)
    (tmp_path / "empty").mkdir(exist_ok=True)
    environment = {key: value for key, value in os.environ.items() if key != "SPP_REQUIRE_TEST_DATA"}
    # a fixed width: the short summary cuts its lines to the terminal's, so a wide CI terminal would count more lines
    environment |= {"SPP_TEST_DATA": str(tmp_path / "empty"), "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}",
                    "COLUMNS": "80", **env}
    # the summary lists skips only (their reasons are never cut); each error prints its message once in its section
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "-rs",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path / "test_probe.py")],
                          cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)


def missing_line(tmp_path) -> str:
    return (f"public test data not found at {tmp_path / 'empty'}: set SPP_TEST_DATA to a folder laid out like "
            "../shared/data (see README)")


def test_missing_data_skips_with_one_line(tmp_path):
    result = run_probe(tmp_path)
    line = missing_line(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 2 skipped" in result.stdout, result.stdout
    assert result.stdout.count(line) == 2, result.stdout


def test_required_data_turns_each_skip_into_a_failure(tmp_path):
    result = run_probe(tmp_path, SPP_REQUIRE_TEST_DATA="1")
    line = missing_line(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    # a fixture that fails is reported as an error at set-up; either way the run fails and names the folder
    assert "1 passed, 2 errors" in result.stdout and "skipped" not in result.stdout, result.stdout
    assert result.stdout.count(line) == 2, result.stdout


def test_the_cut_is_small_and_laid_out_like_the_data():
    sizes = {str(path): (FIXTURE_DATA / path).stat().st_size for path in DATA_FILES}
    assert sum(sizes.values()) < 80_000 and max(sizes.values()) < 20_000, sizes
    assert {"alpaca/alpaca_small.json", "wikitext-2-raw-v1/test.jsonl", "boolq/boolq.jsonl",
            "rte/validation.parquet"} <= set(sizes)
    assert len(json.loads((FIXTURE_DATA / "alpaca" / "alpaca_small.json").read_text())) == 32
    assert all(str(path) in (FIXTURE_DATA / "SOURCES.md").read_text() for path in DATA_FILES)

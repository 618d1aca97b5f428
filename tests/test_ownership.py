"""No command deletes or replaces a file or folder it did not write, in any mode (spp_cli/io/ownership.py): every writer
is tried on an output holding a user's file, or one the user changed since spp wrote it."""

import json
import os
from pathlib import Path

import pytest
from conftest import run_spp

PRUNE = ["prune", "builtin:tiny-llama", "--method", "magnitude"]
PPL = "ppl:builtin:python-docs:test"


@pytest.fixture
def pruned(tmp_path, capsys) -> Path:
    out = tmp_path / "pruned"
    code, _, err = run_spp([*PRUNE, "--sparsity", "0.5", "--out", out], capsys)
    assert code == 0, err
    return out


def touch_later(path: Path) -> None:
    """Change a file's modification time as an edit would (some filesystems keep a coarse clock)."""
    status = path.stat()
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))


def refused(argv, capsys, fragment: str) -> None:
    """Exit 2 with one error line (`spp run` may have named its stages before it)."""
    code, _, err = run_spp(argv, capsys)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("spp: error: ")]
    assert len(errors) == 1 and fragment in errors[0] and err.endswith(errors[0] + "\n"), err


@pytest.mark.parametrize("added", ["NOTES.md", "my_eval/scores.txt"])
def test_overwrite_refuses_a_folder_holding_a_users_file(pruned, capsys, added):
    (pruned / added).parent.mkdir(exist_ok=True)
    (pruned / added).write_text("mine")
    refused([*PRUNE, "--sparsity", "0.6", "--out", pruned, "--overwrite"], capsys,
            f"holds {added}, which spp did not write")
    assert (pruned / added).read_text() == "mine"


@pytest.mark.parametrize("changed", ["generation_config.json", "model.safetensors"])
def test_a_changed_output_is_neither_replaced_nor_skipped(pruned, capsys, changed):
    touch_later(pruned / changed)
    for sparsity in ("0.6", "0.5"):  # other options with --overwrite, then the same options (once a skip)
        refused([*PRUNE, "--sparsity", sparsity, "--out", pruned, "--overwrite"], capsys,
                f"was changed after spp wrote it ({changed})")
    assert (pruned / "spp.json").is_file()


def test_an_untouched_output_is_still_skipped_and_replaced(pruned, capsys):
    code, out, err = run_spp([*PRUNE, "--sparsity", "0.5", "--out", pruned, "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["skipped"] is True, err
    code, out, err = run_spp([*PRUNE, "--sparsity", "0.6", "--out", pruned, "--overwrite", "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["target_sparsity"] == 0.6, err


def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: builtin:tiny-llama\noutput_dir: {tmp_path / 'run'}\nstages:\n"
                    "  - {name: prune, type: prune, method: magnitude, sparsity: 0.5}\n")
    return path


def test_spp_run_with_a_changed_option_keeps_a_users_file_in_a_stage_folder(tmp_path, capsys):
    code, _, err = run_spp(["run", recipe(tmp_path)], capsys)
    assert code == 0, err
    notes = tmp_path / "run" / "prune" / "NOTES.md"
    notes.write_text("mine")
    refused(["run", recipe(tmp_path), "stages.prune.sparsity=0.6"], capsys, "NOTES.md, which spp did not write")
    assert notes.read_text() == "mine"


@pytest.mark.parametrize("name", ["run.json", "report.md"])
def test_spp_run_refuses_a_users_file_where_it_writes_before_any_stage(tmp_path, capsys, name):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).write_text("mine")
    refused(["run", recipe(tmp_path)], capsys, f"'{tmp_path / 'run' / name}' is not a file spp wrote")
    assert (tmp_path / "run" / name).read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [name]  # no stage ran


def test_spp_report_never_draws_over_a_users_plot(tmp_path, capsys):
    code, _, err = run_spp(["run", recipe(tmp_path)], capsys)
    assert code == 0, err
    (tmp_path / "run" / "sparsity.png").write_bytes(b"my plot")
    refused(["report", tmp_path / "run"], capsys, "sparsity.png' is not a file spp wrote")
    assert (tmp_path / "run" / "sparsity.png").read_bytes() == b"my plot"
    (tmp_path / "run" / "sparsity.png").unlink()
    code, _, err = run_spp(["report", tmp_path / "run"], capsys)  # spp's own files are replaced as before
    assert code == 0 and (tmp_path / "run" / "sparsity.png").stat().st_size > 1000, err


def test_eval_replaces_a_results_file_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "results.json"
    common = ["eval", "builtin:tiny-llama", "--tasks", PPL, "--seqlen", "64", "--out", out]
    code, _, err = run_spp([*common, "--limit", "2"], capsys)
    assert code == 0, err
    first = out.read_text()
    code, output, err = run_spp([*common, "--limit", "2", "--format", "json"], capsys)
    assert code == 0 and json.loads(output).get("skipped") is True and out.read_text() == first, err
    refused([*common, "--limit", "3"], capsys, "holds a result made with other options: pass --overwrite")
    assert out.read_text() == first
    code, _, err = run_spp([*common, "--limit", "3", "--overwrite"], capsys)
    assert code == 0 and json.loads(out.read_text())["config"]["limit"] == 3, err

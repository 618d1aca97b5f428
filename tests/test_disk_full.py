"""A full disk anywhere in a stage is one line (exit 3) naming the output being written and the resume folder's
path and size, not a raw OSError / SafetensorError (spp_cli/io/disk_full.py)."""

import errno

import pytest
from conftest import run_spp
from safetensors import SafetensorError

from spp_cli.io import atomic
from spp_cli.io.disk_full import human_size, is_disk_full

FULL = {
    "OSError": OSError(errno.ENOSPC, "No space left on device"),
    "SafetensorError": SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
}


def raises(error: Exception):
    def full(*args, **kwargs):
        raise error

    return full


@pytest.mark.parametrize("kind", list(FULL))
def test_a_full_disk_while_pruning_is_one_line_naming_the_output(tmp_path, random_model_dir, capsys, monkeypatch,
                                                                 kind):
    monkeypatch.setattr(atomic, "publish", raises(FULL[kind]))  # the last write of a streamed or in-memory prune
    out = tmp_path / "pruned"
    code, _, err = run_spp(["prune", random_model_dir, "--method", "magnitude", "--sparsity", "0.5", "--out", out],
                           capsys)
    assert code == 3
    line = err.splitlines()[-1]
    assert line.startswith(f"spp: error: the disk is full while writing '{out}'")
    assert line.endswith(": free space on that disk (or choose another --out) and rerun")
    assert "Traceback" not in err and not out.exists()


def test_a_full_disk_names_the_resume_folder_and_its_size(tmp_path, random_model_dir, some_data, capsys,
                                                          monkeypatch):
    pruned = tmp_path / "pruned"
    code, _, err = run_spp(["prune", random_model_dir, "--method", "magnitude", "--pattern", "2:4", "--out", pruned],
                           capsys)
    assert code == 0, err
    # the merged model's save fails, after training wrote its checkpoints
    monkeypatch.setattr(atomic, "publish", raises(FULL["OSError"]))  # both merge paths publish through it
    out = tmp_path / "tuned"
    code, _, err = run_spp(["finetune", pruned, "--data", some_data / "alpaca" / "alpaca_small.json",
                            "--max-steps", "2", "--save-steps", "1", "--batch-size", "4", "--micro-batch-size", "4",
                            "--seqlen", "32", "--val-size", "0", "--out", out], capsys)
    resume = tmp_path / ".tuned.spp-work"
    assert code == 3 and any(resume.glob("checkpoints/checkpoint-*"))
    size = human_size(sum(path.stat().st_size for path in resume.rglob("*") if path.is_file()))
    assert err.splitlines()[-1] == (
        f"spp: error: the disk is full while writing '{out}'; the resume folder '{resume}' holds {size} (kept for "
        "the rerun to continue from; delete it to start over): free space on that disk (or choose another --out) "
        "and rerun")


def test_what_counts_as_a_full_disk():
    assert is_disk_full(FULL["OSError"]) and is_disk_full(FULL["SafetensorError"])
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    wrapped = RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos")
    wrapped.__context__ = FULL["OSError"]
    assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied")) and not is_disk_full(None)
    assert [human_size(n) for n in (512, 1536, 5 * 2**30)] == ["512 bytes", "1.5 KB", "5.0 GB"]


def test_a_full_disk_outside_a_stage_is_one_line(tmp_path, capsys, monkeypatch):
    import spp_cli.environment as environment

    def full():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(environment, "environment_report", full)
    code, _, err = run_spp(["env"], capsys)
    assert code == 3 and err == f"spp: error: the disk is full while writing '{tmp_path / 'x'}': free space on that " \
                                "disk and rerun\n"

"""Nothing a user owns is ever deleted, renamed or modified: --overwrite replaces only outputs spp wrote, and
every publish is atomic with one naming scheme for hidden siblings (spp_cli/io/atomic.py, spp_cli/io/outputs.py)."""

import json
import os

import pytest
from conftest import run_spp

from spp_cli.io.atomic import atomic_dir, remove_stale, sibling, write_text_atomic


def magnitude_prune(out, *extra):
    return ["prune", "builtin:tiny-llama", "--method", "magnitude", "--sparsity", "0.5", "--out", str(out), *extra]


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("flag", [[], ["--overwrite"]])
def test_a_user_folder_is_never_replaced(tmp_path, capsys, flag):
    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "important.csv").write_text("a,b\n1,2\n")
    code, _, err = run_spp(magnitude_prune(mine, *flag), capsys)
    assert code == 2 and err.count("\n") == 1
    assert "spp did not write" in err and "--overwrite" not in err  # never suggests replacing it
    assert (mine / "important.csv").read_text() == "a,b\n1,2\n"
    assert listing(tmp_path) == ["mydata"] and listing(mine) == ["important.csv"]  # no debris beside it


def test_a_plain_file_as_out_is_refused_and_left_alone(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code, _, err = run_spp(magnitude_prune(target, "--overwrite"), capsys)
    assert code == 2 and "is a file that spp did not write" in err
    assert target.read_text() == "mine" and listing(tmp_path) == ["notes.txt"]


def test_a_forged_manifest_does_not_make_a_folder_spps(tmp_path, capsys):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "spp.json").write_text(json.dumps({"stage": "prune", "manifest_sha256": "0" * 64}))
    (fake / "keep.bin").write_bytes(b"x")
    code, _, err = run_spp(magnitude_prune(fake, "--overwrite"), capsys)
    assert code == 2 and "spp did not write" in err and (fake / "keep.bin").exists()


def test_overwrite_replaces_an_spp_output_atomically_and_follows_the_umask(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert run_spp(magnitude_prune(out), capsys)[0] == 0
    first = json.loads((out / "spp.json").read_text())["manifest_sha256"]
    code, _, err = run_spp(magnitude_prune(out, "--sparsity", "0.6"), capsys)
    assert code == 2 and "pass --overwrite to replace it" in err
    assert run_spp(magnitude_prune(out, "--sparsity", "0.6", "--overwrite"), capsys)[0] == 0
    assert json.loads((out / "spp.json").read_text())["manifest_sha256"] != first
    assert listing(tmp_path) == ["pruned"]
    umask = os.umask(0)
    os.umask(umask)
    for path in [out, *out.iterdir()]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, path.name


def test_eval_out_never_replaces_a_user_file(tmp_path, capsys):
    mine = tmp_path / "results.json"
    mine.write_text('{"my": "numbers"}')
    code, _, err = run_spp(["eval", "builtin:tiny-llama", "--tasks", "ppl:builtin:python-docs:test", "--limit", "1",
                            "--seqlen", "32", "--out", str(mine)], capsys)
    assert code == 2 and "not an spp results file" in err and mine.read_text() == '{"my": "numbers"}'


def test_spp_run_never_replaces_a_user_folder_in_a_stage_place(tmp_path, capsys):
    (tmp_path / "run" / "prune").mkdir(parents=True)
    (tmp_path / "run" / "prune" / "thesis.tex").write_text("\\section{}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: builtin:tiny-llama\noutput_dir: run\nstages:\n"
                      "  - {type: prune, method: magnitude, sparsity: 0.5}\n")
    code, _, err = run_spp(["run", str(recipe)], capsys)
    assert code == 2 and "spp did not write" in err
    assert listing(tmp_path / "run" / "prune") == ["thesis.tex"]


def test_a_failed_write_leaves_the_old_output_and_no_sibling(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as staging:
        (staging / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "a").write_text("2")
        raise RuntimeError("disk full")
    assert (target / "a").read_text() == "1" and listing(tmp_path) == ["out"]
    write_text_atomic(tmp_path / "r.json", "{}")
    assert (tmp_path / "r.json").read_text() == "{}" and listing(tmp_path) == ["out", "r.json"]


def test_stale_siblings_of_a_killed_process_are_tidied_and_a_replaced_output_comes_back(tmp_path):
    target = tmp_path / "out"
    dead_pid = 2**22 + 12345  # above the kernel's pid_max: never a running process
    sibling(target, "staging", dead_pid).mkdir()
    replaced = sibling(target, "replaced", dead_pid)
    replaced.mkdir()
    (replaced / "spp.json").write_text("{}")
    remove_stale(target)  # killed between the two renames: the old output is put back, the half-written one goes
    assert listing(tmp_path) == ["out"] and (target / "spp.json").exists()

"""The CLI frame: every command is there, errors are one line with the right exit code, --help is quick."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_spp

COMMANDS = ("prune", "finetune", "merge", "eval", "run", "verify", "report", "env")


def test_help_lists_every_command_with_examples(capsys):
    code, out, _ = run_spp(["--help"], capsys)
    assert code == 0
    for command in COMMANDS:
        assert command in out
    for command in COMMANDS:
        code, out, _ = run_spp([command, "--help"], capsys)
        assert code == 0 and "Example" in out, command


def test_help_answers_without_importing_torch():
    """`spp --help` must stay fast: heavy libraries are imported inside the commands."""
    code = (
        "import sys; from spp_cli.cli import run_cli; run_cli(['--help']); "
        "print(sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules))"
    )
    started = time.time()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert time.time() - started < 10  # generous for a loaded CI machine; typically ~0.3 s


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune"], "Missing argument 'model'"),
        (["prune", "m", "--method", "pruneit", "--out", "o"], "'pruneit' is not one of"),
        (["prune", "m", "--method", "wanda", "--out", "o", "--sparsity", "abc"], "Invalid value for '--sparsity'"),
        (["bogus"], "No such command 'bogus'"),
        (["eval", "m", "--out", "r.json", "--nope"], "No such option: --nope"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(capsys, argv, message):
    code, _, err = run_spp(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("spp: error: ") and message in err
    assert "Traceback" not in err


def test_version_and_env(capsys):
    code, out, _ = run_spp(["--version"], capsys)
    assert code == 0 and out.startswith("spp 0.")
    code, out, _ = run_spp(["env", "--format", "json"], capsys)
    assert code == 0 and '"torch"' in out


def test_debug_shows_the_traceback(tmp_path):
    env = {"SPP_DEBUG": "1", "PATH": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "spp_cli", "verify", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert result.returncode != 0 and "Traceback" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "spp_cli", "verify", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "has no spp.json" in result.stderr


def test_json_output_keeps_what_libraries_print_off_stdout(tmp_path, capsys, monkeypatch):
    """deepspeed's logger prints to stdout when accelerate imports it mid-run; with --format json that line
    would make stdout unparseable, so everything but the result goes to stderr for the command's duration."""
    import spp_cli.stages.prune as prune_stage

    real_prune = prune_stage.prune

    def noisy_prune(*args, **kwargs):
        print("[WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.")
        return real_prune(*args, **kwargs)

    monkeypatch.setattr(prune_stage, "prune", noisy_prune)
    code, out, err = run_spp(["prune", "builtin:tiny-llama", "--method", "magnitude", "--sparsity", "0.5",
                              "--out", tmp_path / "m50", "--format", "json"], capsys)
    assert code == 0
    assert json.loads(out)["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "Setting accelerator to CPU" in err and "Setting accelerator" not in out
    print("after the command")  # stdout is the caller's again
    assert capsys.readouterr().out == "after the command\n"


@pytest.mark.parametrize("case", ["usage", "bad input", "runtime failure"])
def test_json_errors_are_a_json_object_on_stdout_and_one_line_on_stderr(tmp_path, capsys, monkeypatch, case):
    if case == "runtime failure":
        import spp_cli.environment

        def broken_report():
            raise RuntimeError("the probe died")

        monkeypatch.setattr(spp_cli.environment, "environment_report", broken_report)
    argv, code, message = {
        "usage": (["prune", "m", "--method", "pruneit", "--out", "o"], 2, "'pruneit' is not one of"),
        "bad input": (["verify", tmp_path / "missing"], 2, f"'{tmp_path / 'missing'}' has no spp.json"),
        "runtime failure": (["env"], 3, "RuntimeError: the probe died (rerun with SPP_DEBUG=1 for the traceback)"),
    }[case]
    exit_code, out, err = run_spp([*argv, "--format", "json"], capsys)
    error = json.loads(out)
    assert exit_code == code and error == {"error": error["error"], "exit_code": code} and message in error["error"]
    assert err == f"spp: error: {error['error']}\n"
    exit_code, out, err = run_spp(argv, capsys)  # for people: stdout stays empty, the same line on stderr
    assert exit_code == code and out == "" and err == f"spp: error: {error['error']}\n"


def test_libraries_print_no_bars_or_warnings_unless_verbose(tmp_path):
    """transformers' "Writing model shards" bar (saving in memory) and PEFT's FutureWarning for lora reach the
    console only with --verbose; spp's own lines are all there is otherwise."""
    def spp(*argv):
        result = subprocess.run([sys.executable, "-m", "spp_cli", *map(str, argv)], capture_output=True, text=True,
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr
        return result.stderr

    prune = ["prune", "builtin:tiny-llama", "--method", "magnitude", "--sparsity", "0.5", "--streaming", "off"]
    finetune = ["finetune", tmp_path / "pruned", "--method", "lora", "--max-steps", "1", "--data",
                "builtin:python-docs", "--batch-size", "2", "--micro-batch-size", "2", "--seqlen", "32", "--val-size",
                "0", "--device", "cpu"]
    noise = ("Writing model shards", "FutureWarning", "%|")
    for argv in ([*prune, "--out", tmp_path / "pruned"], [*finetune, "--out", tmp_path / "tuned"]):
        err = spp(*argv)
        assert not [marker for marker in noise if marker in err], err
    assert "Writing model shards: 100%|" in spp("--verbose", *prune, "--out", tmp_path / "pruned-verbose")
    assert "FutureWarning" in spp("--verbose", *finetune, "--out", tmp_path / "tuned-verbose")

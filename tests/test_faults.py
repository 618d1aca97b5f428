"""Faults, in real subprocesses: kill -9 and Ctrl-C never leave a complete-looking output, and reruns resume.
Also: inputs are never modified, and identical runs give identical manifests."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_spp
from safetensors.torch import load_file

from spp_cli.io.checkpoint import is_complete

C4 = "c4/c4-train.00000-of-01024.first1000.jsonl"
ALPACA = "alpaca/alpaca_small.json"


def spp_process(argv: list, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "spp_cli", *map(str, argv)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def file_hashes(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def wait_for(condition, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError("timed out waiting for the process to reach the point to interrupt")
        time.sleep(0.05)


def test_kill_9_during_prune_leaves_nothing_complete_and_a_rerun_completes(tmp_path, random_model_dir, some_data):
    out = tmp_path / "pruned"
    argv = [
        "prune",
        random_model_dir,
        "--method",
        "sparsegpt",
        "--sparsity",
        "0.5",
        "--calib",
        some_data / C4,
        "--nsamples",
        "8",
        "--seqlen",
        "64",
        "--out",
        out,
    ]
    process = spp_process(argv)
    line = process.stderr.readline()
    while line.startswith("spp: plan: "):  # the stage's memory plan comes first
        line = process.stderr.readline()
    assert "block 1" in line, line + process.stderr.read()  # the first block's progress line: pruning is under way
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not is_complete(out) and not out.exists()
    rerun = spp_process(argv)
    assert rerun.wait() == 0, rerun.stderr.read()
    assert is_complete(out)


@pytest.fixture
def pruned_dir(tmp_path, random_model_dir, capsys):
    out = tmp_path / "pruned"
    code, _, err = run_spp(
        ["prune", random_model_dir, "--method", "magnitude", "--pattern", "2:4", "--out", out], capsys
    )
    assert code == 0, err
    return out


def finetune_argv(pruned: Path, out: Path, data: Path) -> list:
    return [
        "finetune",
        pruned,
        "--data",
        data / ALPACA,
        "--max-steps",
        "12",
        "--save-steps",
        "2",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "4",
        "--seqlen",
        "64",
        "--val-size",
        "0",
        "--out",
        out,
    ]


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("interrupt", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_finetune_resumes_to_the_uninterrupted_result(tmp_path, pruned_dir, some_data, interrupt):
    reference = tmp_path / "reference"
    straight = spp_process(finetune_argv(pruned_dir, reference, some_data))
    assert straight.wait() == 0, straight.stderr.read()

    out = tmp_path / "tuned"
    checkpoints = tmp_path / ".tuned.spp-work" / "checkpoints"
    process = spp_process(finetune_argv(pruned_dir, out, some_data))
    wait_for(lambda: (checkpoints / "checkpoint-2" / "trainer_state.json").exists() or process.poll() is not None)
    assert process.poll() is None, "finished before it could be interrupted: " + process.stderr.read()
    process.send_signal(interrupt)
    code = process.wait()
    if interrupt == signal.SIGINT:
        assert code == 130 and "interrupted" in process.stderr.read()
    assert not is_complete(out)
    assert any(checkpoints.glob("checkpoint-*"))  # the resumable state is kept

    rerun = spp_process(finetune_argv(pruned_dir, out, some_data))
    assert rerun.wait() == 0, rerun.stderr.read()
    resumed = json.loads((out / "adapter" / "run.json").read_text())["resumed_from"]
    assert resumed in {f"checkpoint-{step}" for step in range(2, 12, 2)}
    # the resume is reported (run.json, the returned manifest), but the hashed manifest is the uninterrupted one's
    manifests = [json.loads((path / "spp.json").read_text()) for path in (reference, out)]
    assert manifests[0]["manifest_sha256"] == manifests[1]["manifest_sha256"]
    expected, actual = adapter_tensors(reference), adapter_tensors(out)
    assert expected.keys() == actual.keys()
    for key in expected:  # same seeds on CPU: the resumed adapter equals the uninterrupted one
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


def test_inputs_are_never_modified_and_identical_runs_are_identical(tmp_path, random_model_dir, some_data, capsys):
    before = file_hashes(random_model_dir)
    manifests = []
    for run in ("a", "b"):
        pruned, tuned = tmp_path / run / "pruned", tmp_path / run / "tuned"
        steps = [
            [
                "prune",
                random_model_dir,
                "--method",
                "wanda",
                "--sparsity",
                "0.6",
                "--calib",
                some_data / C4,
                "--nsamples",
                "4",
                "--seqlen",
                "64",
                "--out",
                pruned,
            ],
            [
                "finetune",
                pruned,
                "--data",
                some_data / ALPACA,
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--micro-batch-size",
                "4",
                "--seqlen",
                "64",
                "--out",
                tuned,
                "--no-merge",
            ],
            ["merge", tuned / "adapter", "--out", tmp_path / run / "merged"],
            [
                "eval",
                random_model_dir,
                pruned,
                "--tasks",
                f"ppl:{some_data / ALPACA}",
                "--seqlen",
                "64",
                "--limit",
                "2",
                "--out",
                tmp_path / run / "results.json",
            ],
            ["verify", tmp_path / run / "merged", "--against", pruned],
        ]
        for argv in steps:
            parent_files = {path: file_hashes(path) for path in (random_model_dir, pruned) if path.exists()}
            code, _, err = run_spp(argv, capsys)
            assert code == 0, (argv[0], err)
            for path, hashes in parent_files.items():
                if path != argv[-1]:
                    assert file_hashes(path) == hashes, f"{argv[0]} modified {path}"
        manifests.append(
            {
                stage: json.loads((tmp_path / run / stage / "spp.json").read_text())
                for stage in ("pruned", "tuned", "merged")
            }
        )
    assert file_hashes(random_model_dir) == before
    first, second = manifests
    for stage in ("pruned", "tuned", "merged"):
        assert first[stage]["manifest_sha256"] == second[stage]["manifest_sha256"], stage
        for name, record in first[stage]["layers"].items():
            assert record["weight_sha256"] == second[stage]["layers"][name]["weight_sha256"]


def test_finetune_cli_under_torchrun_ddp_keeps_every_zero(tmp_path, pruned_dir, some_data, capsys):
    """`torchrun -m spp_cli finetune` with 2 CPU processes (gloo): rank 0 merges, checks and saves, on a weightless
    base (the parent streams): its adapter merged in memory by `spp merge --streaming off` is its output's bytes."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            "-m",
            "spp_cli",
            "finetune",
            pruned_dir,
            "--data",
            some_data / ALPACA,
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--micro-batch-size",
            "2",
            "--seqlen",
            "64",
            "--val-size",
            "0",
            "--out",
            out,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    manifest = json.loads((out / "spp.json").read_text())
    assert manifest["training"]["steps"] == 2 and manifest["parent"]["manifest_sha256"]
    code = subprocess.run(
        [sys.executable, "-m", "spp_cli", "verify", out, "--against", pruned_dir],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert code.returncode == 0, code.stdout + code.stderr
    code, _, err = run_spp(["merge", out / "adapter", "--out", tmp_path / "in-memory", "--streaming", "off"], capsys)
    assert code == 0, err
    assert (tmp_path / "in-memory" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()

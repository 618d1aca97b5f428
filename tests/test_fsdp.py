"""FSDP2 for real on CPU: `accelerate launch` with 2 gloo processes through `spp finetune`, against one process.

accelerate 1.16 ignores an FSDP config on CPU (it runs DDP; the second test shows it), so the FSDP2 run goes
through tests/fsdp_on_cpu.py, which lifts only that gate: the Trainer, accelerate's fully_shard of every decoder
block, the FSDP checkpoints and rank 0's merge on the gathered adapters are the code a GPU run executes.

Equality with one process uses the dropout-free form (--dropout 0, --forward fused): with dropout each rank draws
its own masks, so rank 1's micro-batch sees different masks than the one process's second micro-batch and the
runs differ by design. Without it both runs see the same examples per step (accelerate hands batch k of the
sampler to rank k % 2; one process takes both as 2 accumulated micro-batches) and the same arithmetic up to the
order of the gradient sum over the 2 micro-batches, which for 2 terms is exact (a + b == b + a; FSDP's ×2 / ÷2 for
the mean is a power of 2). So the merged weights must agree bit for bit; the stated tolerance, 1e-6 of each
tensor's largest magnitude (about 8 fp32 ulps), leaves room only for a reduction order that a future gloo or
torch might change, far below the adapters' movement (β moves by ~1e-2 here).
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_spp
from safetensors.torch import load_file

ALPACA = "alpaca/alpaca_small.json"
FSDP2_CPU = REPO / "recipes" / "launch" / "fsdp2-cpu.yaml"
TOLERANCE = 1e-6  # relative to each merged tensor's max |w|; see the module docstring


def finetune_options(test_data: Path, out: Path) -> list:
    """8 optimizer steps of a global batch of 4 (2 processes × 2, or 1 × 2 × 2 accumulated), saving every 2."""
    return ["--data", test_data / ALPACA, "--max-steps", "8", "--save-steps", "2", "--batch-size", "4",
            "--micro-batch-size", "2", "--seqlen", "64", "--val-size", "0", "--dropout", "0", "--forward", "fused",
            "--out", out]


def accelerate_launch(program: list, timeout: int = 240, background: bool = False):
    """`accelerate launch --config_file recipes/launch/fsdp2-cpu.yaml PROGRAM...`: its CompletedProcess, or with
    background=True the running Popen."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    command = [str(c) for c in [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP2_CPU,
                                "--main_process_port", port, *program]]
    if background:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def kill_9_with_workers(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it (torchrun's workers run in their own sessions, so killing
    the launcher alone would leave them training)."""
    def descendants(pid: int) -> list[int]:
        children = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(FileNotFoundError):  # a thread or process that just ended
                children += [int(c) for c in (task / "children").read_text().split()]
        return children + [d for child in children for d in descendants(child)]

    for pid in [process.pid, *descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.is_file():
        assert process.poll() is None and time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture
def pruned_dir(tmp_path, random_model_dir, capsys):
    out = tmp_path / "pruned"
    code, _, err = run_spp(["prune", random_model_dir, "--method", "magnitude", "--pattern", "2:4", "--out", out],
                           capsys)
    assert code == 0, err
    return out


def manifest(directory: Path) -> dict:
    return json.loads((directory / "spp.json").read_text())


def zero_hashes(directory: Path) -> dict[str, str]:
    return {name: record["zeros_sha256"] for name, record in manifest(directory)["layers"].items()}


@pytest.mark.slow
def test_fsdp2_two_processes_resume_keep_every_zero_and_equal_one_process(tmp_path, pruned_dir, test_data, capsys):
    """Killed with -9 after its first checkpoint and rerun, the FSDP2 run ends where one uninterrupted process
    does."""
    sharded, single = tmp_path / "fsdp2", tmp_path / "single"
    program = [REPO / "tests" / "fsdp_on_cpu.py", "finetune", pruned_dir, *finetune_options(test_data, sharded)]
    first = accelerate_launch(program, background=True)
    wait_for(tmp_path / ".fsdp2.spp-work" / "checkpoints" / "checkpoint-2" / "trainer_state.json", first)
    kill_9_with_workers(first)
    assert not sharded.exists()
    saved = tmp_path / ".fsdp2.spp-work" / "checkpoints" / "checkpoint-2"
    assert {"adapter_model.safetensors", "optimizer.bin", "scheduler.pt"} <= {p.name for p in saved.iterdir()}
    assert not (saved / "pytorch_model_fsdp.bin").exists()  # the frozen base is never written to a checkpoint
    completed = accelerate_launch(program)
    assert completed.returncode == 0, completed.stderr[-3000:]
    code, _, err = run_spp(["finetune", pruned_dir, *finetune_options(test_data, single)], capsys)
    assert code == 0, err

    training = manifest(sharded)["training"]
    assert (training["parallelism"], training["processes"], training["steps"]) == ("fsdp2", 2, 8)
    assert training["resumed_from"] in ("checkpoint-2", "checkpoint-4", "checkpoint-6")
    assert manifest(single)["training"]["parallelism"] == "single"
    assert zero_hashes(sharded) == zero_hashes(pruned_dir) and len(zero_hashes(sharded)) == 14
    code, out, err = run_spp(["verify", sharded, "--against", pruned_dir], capsys)
    assert code == 0, out + err

    want, got = load_file(single / "model.safetensors"), load_file(sharded / "model.safetensors")
    assert want.keys() == got.keys()
    worst = max(float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want)
    assert worst <= TOLERANCE, f"merged weights differ by {worst:.2e} of their scale"
    adapters = load_file(sharded / "adapter" / "adapter_model.safetensors")
    moved = max(float(t.abs().max()) for name, t in adapters.items() if name.endswith("spp_beta"))
    assert moved > 1e-3  # the adapters trained, so the equality is not that of two untouched models
    assert manifest(sharded)["training"]["loss_curve"] == manifest(single)["training"]["loss_curve"]


@pytest.mark.slow
def test_accelerate_on_cpu_runs_ddp_when_asked_for_fsdp_and_says_so(tmp_path, pruned_dir, test_data, capsys):
    """The refusal, observed: plain `accelerate launch --config_file fsdp2-cpu.yaml -m spp_cli finetune` trains
    with DDP (accelerate keeps MULTI_CPU and drops the FSDP plugin, without a message of its own)."""
    out = tmp_path / "asked-fsdp"
    completed = accelerate_launch(["-m", "spp_cli", "finetune", pruned_dir, *finetune_options(test_data, out)])
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "the launch config asks for FSDP but accelerate ran ddp" in completed.stderr
    training = manifest(out)["training"]
    assert (training["parallelism"], training["processes"]) == ("ddp", 2)
    assert zero_hashes(out) == zero_hashes(pruned_dir)

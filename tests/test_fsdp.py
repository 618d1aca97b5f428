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
torch might change, far below the adapters' movement (β moves by ~1e-2 here). Plain DDP (the second test) is
held to the same tolerance, and so is DeepSpeed ZeRO-3 (the third, skipped without deepspeed; measured 1.1e-7,
as ZeRO reduces flattened gradient buckets).
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
from conftest import REPO, SOME_DATA
from safetensors.torch import load_file

ALPACA = "alpaca/alpaca_small.json"
FSDP2_CPU = REPO / "recipes" / "launch" / "fsdp2-cpu.yaml"
ZERO3_CPU = REPO / "recipes" / "launch" / "deepspeed_zero3-cpu.yaml"
TOLERANCE = 1e-6  # relative to each merged tensor's max |w|; see the module docstring


def finetune_options(data: Path, out: Path, method: str = "spp") -> list:
    """8 optimizer steps of a global batch of 4 (2 processes × 2, or 1 × 2 × 2 accumulated), saving every 2.
    masked-lora at --dropout 0 runs its one-GEMM form (the analogue of SPP's --forward fused)."""
    method_options = ["--forward", "fused"] if method == "spp" else ["--method", method]
    return ["--data", data / ALPACA, "--max-steps", "8", "--save-steps", "2", "--batch-size", "4",
            "--micro-batch-size", "2", "--seqlen", "64", "--val-size", "0", "--dropout", "0", *method_options,
            "--out", out]


def accelerate_launch(config: Path, program: list, timeout: int = 240, background: bool = False):
    """`accelerate launch --config_file CONFIG PROGRAM...`: its CompletedProcess, or with background=True the
    running Popen."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    command = [str(c) for c in [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
                                "--main_process_port", port, *program]]
    if background:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def kill_9_with_workers(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it (a SIGKILL does not propagate: killing the launcher
    alone leaves torchrun's workers training)."""
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A folder with `pruned/` (a random tiny LLaMA, magnitude 2:4) and `single/`, its one-process fine-tune."""
    from tiny_models import save_random_model

    from spp_cli.cli import run_cli

    root = tmp_path_factory.mktemp("multi-device")
    save_random_model(root / "dense")
    assert run_cli(["prune", str(root / "dense"), "--method", "magnitude", "--pattern", "2:4",
                    "--out", str(root / "pruned")]) == 0
    assert run_cli(["finetune", str(root / "pruned"), *map(str, finetune_options(SOME_DATA, root / "single"))]) == 0
    assert run_training(root / "single")["parallelism"] == "single"
    return root


def assert_equal_to_one_process(runs: Path, out: Path, single: str = "single", moving: str = "spp_beta") -> None:
    """Zeros kept (manifest hashes and `spp verify --against`) and merged weights within TOLERANCE of the
    one-process run `runs/single`; `moving` names the adapter tensors that start at zero."""
    assert zero_hashes(out) == zero_hashes(runs / "pruned") and len(zero_hashes(out)) == 14
    verify = subprocess.run([sys.executable, "-m", "spp_cli", "verify", str(out), "--against", str(runs / "pruned")],
                            cwd=REPO, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    want, got = load_file(runs / single / "model.safetensors"), load_file(out / "model.safetensors")
    assert want.keys() == got.keys()
    worst = max(float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want)
    assert worst <= TOLERANCE, f"merged weights differ by {worst:.2e} of their scale"
    adapters = load_file(out / "adapter" / "adapter_model.safetensors")
    moved = max(float(t.abs().max()) for name, t in adapters.items() if name.endswith(moving))
    assert moved > 1e-3  # the adapters trained, so the equality is not that of two untouched models


def manifest(directory: Path) -> dict:
    return json.loads((directory / "spp.json").read_text())


def run_training(directory: Path) -> dict:
    """The hashed training record plus this run's own statistics (adapter/run.json: parallelism, resume)."""
    return {**manifest(directory)["training"], **json.loads((directory / "adapter" / "run.json").read_text())}


def zero_hashes(directory: Path) -> dict[str, str]:
    return {name: record["zeros_sha256"] for name, record in manifest(directory)["layers"].items()}


@pytest.mark.slow
def test_fsdp2_two_processes_resume_keep_every_zero_and_equal_one_process(runs, tmp_path):
    """Killed with -9 after its first checkpoint and rerun, the FSDP2 run ends where one uninterrupted process
    does."""
    sharded = tmp_path / "fsdp2"
    program = [REPO / "tests" / "fsdp_on_cpu.py", "finetune", runs / "pruned", *finetune_options(SOME_DATA, sharded)]
    first = accelerate_launch(FSDP2_CPU, program, background=True)
    saved = tmp_path / ".fsdp2.spp-work" / "checkpoints" / "checkpoint-2"
    wait_for(saved / "trainer_state.json", first)
    kill_9_with_workers(first)
    assert not sharded.exists()
    assert {"adapter_model.safetensors", "optimizer.bin", "scheduler.pt"} <= {p.name for p in saved.iterdir()}
    assert not (saved / "pytorch_model_fsdp.bin").exists()  # the frozen base is never written to a checkpoint
    completed = accelerate_launch(FSDP2_CPU, program)
    assert completed.returncode == 0, completed.stderr[-3000:]
    training = run_training(sharded)
    assert (training["parallelism"], training["processes"], training["steps"]) == ("fsdp2", 2, 8)
    assert training["resumed_from"] in ("checkpoint-2", "checkpoint-4", "checkpoint-6")
    assert_equal_to_one_process(runs, sharded)
    sharded_curve, single_curve = training["loss_curve"], run_training(runs / "single")["loss_curve"]
    # The resumed sharded run's gradient sum is reordered: on the shared test model (tests/tiny_models.py) one step's
    # loss moved by 8e-8 relative (bit-equal on the model the test used before), within the weights' tolerance
    assert [(p["step"], p["lr"]) for p in sharded_curve] == [(p["step"], p["lr"]) for p in single_curve]
    assert [p["loss"] for p in sharded_curve] == pytest.approx([p["loss"] for p in single_curve], rel=TOLERANCE)


@pytest.mark.slow
def test_fsdp2_two_processes_masked_lora_keeps_every_zero_and_equals_one_process(runs, tmp_path):
    """masked-lora's custom backward under fully_shard: A and B are sharded DTensors, the bool support a
    replicated buffer. Same dropout-free argument and TOLERANCE as SPP (module docstring): the only difference
    from one process is the order of a 2-term gradient sum, exact in fp32."""
    from spp_cli.cli import run_cli

    single = runs / "single-masked-lora"
    assert run_cli(["finetune", str(runs / "pruned"),
                    *map(str, finetune_options(SOME_DATA, single, "masked-lora"))]) == 0
    sharded = tmp_path / "fsdp2-masked-lora"
    program = [REPO / "tests" / "fsdp_on_cpu.py", "finetune", runs / "pruned",
               *finetune_options(SOME_DATA, sharded, "masked-lora")]
    completed = accelerate_launch(FSDP2_CPU, program)
    assert completed.returncode == 0, completed.stderr[-3000:]
    training = run_training(sharded)
    assert manifest(sharded)["method"] == "masked-lora"
    assert (training["parallelism"], training["processes"], training["steps"]) == ("fsdp2", 2, 8)
    assert_equal_to_one_process(runs, sharded, single.name, moving="lora_B")
    sharded_curve, single_curve = training["loss_curve"], run_training(single)["loss_curve"]
    # The reordered gradient sum moves A and B by ~1 ulp, measured 8e-8 of the loss
    assert [(p["step"], p["lr"]) for p in sharded_curve] == [(p["step"], p["lr"]) for p in single_curve]
    assert [p["loss"] for p in sharded_curve] == pytest.approx([p["loss"] for p in single_curve], rel=TOLERANCE)


@pytest.mark.slow
def test_accelerate_on_cpu_runs_ddp_when_asked_for_fsdp_and_says_so(runs, tmp_path):
    """The refusal, observed: plain `accelerate launch --config_file fsdp2-cpu.yaml -m spp_cli finetune` trains
    with DDP (accelerate keeps MULTI_CPU and drops the FSDP plugin, without a message of its own)."""
    out = tmp_path / "asked-fsdp"
    completed = accelerate_launch(FSDP2_CPU, ["-m", "spp_cli", "finetune", runs / "pruned",
                                              *finetune_options(SOME_DATA, out)])
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "the launch config asks for FSDP but accelerate ran ddp" in completed.stderr
    training = run_training(out)
    assert (training["parallelism"], training["processes"]) == ("ddp", 2)
    assert_equal_to_one_process(runs, out)


@pytest.mark.slow
def test_deepspeed_zero3_two_processes_keep_every_zero_and_equal_one_process(runs, tmp_path):
    """ZeRO-3 for real on CPU (DeepSpeed's CPU accelerator, gloo); skipped where deepspeed is not installed.
    Measured: 1.1e-7 of the scale (ZeRO reduces flattened gradient buckets, not bit-identical), within TOLERANCE."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3"
    completed = accelerate_launch(ZERO3_CPU, ["-m", "spp_cli", "finetune", runs / "pruned",
                                              *finetune_options(SOME_DATA, out)], timeout=400)
    assert completed.returncode == 0, completed.stderr[-3000:]
    training = run_training(out)
    assert (training["parallelism"], training["processes"], training["steps"]) == ("deepspeed", 2, 8)
    assert_equal_to_one_process(runs, out)

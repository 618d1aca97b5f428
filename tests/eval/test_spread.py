"""Evaluation that spreads (spp_cli/eval/placement.py, processes.py): a model spread over CPU and disk by a device
map, and two data-parallel processes (gloo), each give the numbers of the plain one-process run."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO, SOME_DATA

from spp_cli.errors import BadInput
from spp_cli.eval.placement import normalise_max_memory, parse_max_memory
from spp_cli.recipe.resolve import parse_recipe
from spp_cli.stages.evaluate import evaluate_models

MODEL = "builtin:tiny-llama"  # 4 blocks; in fp32 ~0.8 MB each, embedding and lm_head 2 MB each
TASKS = ["ppl:builtin:python-docs:test", "boolq"]
# fp32: the checkpoint's fp16 computes several times slower on a CPU
OPTIONS = {"seqlen": 64, "limit": 4, "data_dir": str(SOME_DATA), "device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict:
    """The default run: the whole model on the CPU, one process."""
    out = tmp_path_factory.mktemp("plain") / "results.json"
    evaluate_models({"m": MODEL}, TASKS, out, **OPTIONS)
    return json.loads(out.read_text())


def test_max_memory_accepts_the_flag_and_the_mapping_in_one_spelling():
    assert normalise_max_memory("cuda:1=20GiB, cpu=200MB,0=1.5GB") == "0=1.5GB,1=20GiB,cpu=200MB"
    assert parse_max_memory("0=1.5GB,cpu=2KiB") == {0: 1_500_000_000, "cpu": 2048}
    recipe = parse_recipe({"model": MODEL, "stages": [
        {"type": "eval", "tasks": ["wikitext2"], "device_map": "auto", "max_memory": {"cpu": "64GiB", 0: "20GiB"}}]})
    assert recipe.stages[0].max_memory == "0=20GiB,cpu=64GiB"
    for bad, message in [("x=1GB", "device 'x' is unknown"), ("0=lots", "'lots' for device 0 is not a size"),
                         ("0=1GB,cuda:0=2GB", "given twice"), (",", "empty")]:
        with pytest.raises(ValueError, match=message):
            parse_max_memory(bad)


def test_an_offloaded_run_equals_the_plain_run(tmp_path, plain):
    """--max-memory cpu=5MB keeps the embedding and one block in RAM and reads the rest from disk as the forward
    reaches it: the same perplexity (within 1e-4 relative; measured equal) and zero-shot accuracy, the same config
    and fingerprint; the placement is in "applied", and the scratch offload folder is gone afterwards."""
    out = tmp_path / "results.json"
    evaluate_models({"m": MODEL}, TASKS, out, device_map="auto", max_memory="cpu=5MB",
                    offload_folder=str(tmp_path / "offload"), **OPTIONS)
    spread = json.loads(out.read_text())
    entry, reference = spread["models"]["m"], plain["models"]["m"]
    task = TASKS[0]
    assert math.isclose(entry["perplexity"][task]["value"], reference["perplexity"][task]["value"], rel_tol=1e-4)
    assert entry["results"]["boolq"]["acc,none"] == reference["results"]["boolq"]["acc,none"]
    assert spread["config"] == plain["config"] and spread["fingerprint"] == plain["fingerprint"]
    placement = entry["applied"]["placement"]
    assert placement["device_map"] == "auto" and placement["max_memory"] == "cpu=5MB"
    assert placement["modules"].get("disk", 0) >= 4 and placement["modules"]["cpu"] >= 1, placement
    assert "placement" not in reference["applied"]
    assert not (tmp_path / "offload").exists()  # the folder spp made for its scratch went with it


def test_two_gloo_processes_equal_one(tmp_path, plain):
    """`accelerate launch -m spp_cli eval` with 2 CPU processes: each scores half the perplexity windows and half
    of lm-eval's requests; rank 0 writes the numbers of one process (the windows' losses are summed in window
    order, so the perplexity is equal up to nothing; stated tolerance 1e-6 relative)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "results.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    options = [f"--{key.replace('_', '-')}={value}" for key, value in OPTIONS.items()]
    completed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
         "-m", "spp_cli", "eval", MODEL, "--tasks", ",".join(TASKS), *options, "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("evaluation") == 1  # rank 0 alone reports
    spread = json.loads(out.read_text())
    entry, reference = spread["models"][MODEL], plain["models"]["m"]
    task = TASKS[0]
    assert entry["applied"]["processes"] == 2
    assert entry["perplexity"][task]["windows"] == reference["perplexity"][task]["windows"] == 4
    assert math.isclose(entry["perplexity"][task]["value"], reference["perplexity"][task]["value"], rel_tol=1e-6)
    assert entry["results"]["boolq"]["acc,none"] == reference["results"]["boolq"]["acc,none"]
    assert entry["n-samples"] == reference["n-samples"]
    assert spread["config"] == plain["config"]


def test_a_device_map_in_one_of_several_processes_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BadInput, match="--device-map spreads one model over the devices, but this is one of several"):
        evaluate_models({"m": MODEL}, [TASKS[0]], tmp_path / "r.json", device_map="auto", device="cpu")
    assert not (tmp_path / "r.json").exists()

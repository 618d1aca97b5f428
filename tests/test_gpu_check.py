"""scripts/gpu_check.sh --cpu-smoke: the device check's every step at tiny sizes on a CPU, so the script cannot rot
before a GPU runs it: each JSON file it promises, with the keys a reader of the device run looks for."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

STEPS = ["cuda-tests", "model", "run", "verify", "bench-7b", "bench-70b"]
FILES = {"summary.json", "cuda_tests.json", "run.json", "verify.json", "bench-7b.json", "bench-70b.json", "log.txt"}


@pytest.mark.slow
def test_cpu_smoke_writes_every_result_as_json(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert done.returncode == 0, done.stdout + done.stderr + log[-3000:]
    assert {path.name for path in out.iterdir()} == FILES  # at most 8 files: what the device tool brings back
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu-smoke" and summary["ok"] and summary["gpu"] is None
    assert [step["step"] for step in summary["steps"]] == STEPS
    assert all(step["exit_code"] == 0 and step["seconds"] > 0 for step in summary["steps"])

    tests = json.loads((out / "cuda_tests.json").read_text())
    assert tests["skipped"] == len(tests["tests"]) > 0 and tests["failed"] == tests["errors"] == 0
    assert all("no CUDA GPU visible" in test["message"] for test in tests["tests"])

    run = json.loads((out / "run.json").read_text())
    assert [stage["name"] for stage in run["stages"]] == ["wanda-2of4", "sparsegpt-50", "spp-bf16", "spp-fp16",
                                                          "masked-lora-bf16", "masked-lora-fp16", "eval"]
    perplexities = {name: entry["perplexity"]["ppl:builtin:python-docs:test"]["value"]
                    for name, entry in run["evaluation"].items()}
    assert len(perplexities) == 7 and all(value > 1 for value in perplexities.values())
    verify = json.loads((out / "verify.json").read_text())
    assert verify["ok"] and all(report["lost_zeros"] == 0 for report in verify["models"].values())

    for name, blocks in (("bench-7b.json", 2), ("bench-70b.json", 1)):
        bench = json.loads((out / name).read_text())
        assert bench["model"]["shape"] == "tiny" and bench["model"]["blocks_built"] == blocks
        assert len(bench["prune"]) == 4 and bench["recovery"]["methods"][0]["method"] == "lora"
        assert bench["semi_structured"]["available"] is False
    assert not list(tmp_path.glob("spp-gpu-check.*"))  # the work folder is removed

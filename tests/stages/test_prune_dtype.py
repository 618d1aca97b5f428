"""The prune stage's compute dtype: on a CPU, `auto` computes an fp16 checkpoint in fp32 (fp16 matmuls are slow
there), keeps bf16 where the CPU has bf16 instructions, and always saves in the checkpoint's dtype."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import ALPACA, save_random_model

from spp_cli.stages import prune as prune_stage
from spp_cli.stages.prune import compute_dtype, cpu_auto_dtype, prune


@pytest.mark.parametrize(("stored", "native_bf16", "expected"), [
    ("float16", True, "float32"), ("float16", False, "float32"),
    ("bfloat16", True, None), ("bfloat16", False, "float32"),
    ("float32", True, None), (None, True, None),
])
def test_cpu_auto_dtype(stored, native_bf16, expected):
    assert cpu_auto_dtype(stored, native_bf16) == expected


def test_compute_dtype_keeps_a_requested_dtype_and_the_checkpoints_on_a_gpu(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float16"}))
    assert compute_dtype("auto", str(tmp_path), "cpu") == "float32"
    assert compute_dtype("float16", str(tmp_path), "cpu") == "float16"
    assert compute_dtype("auto", str(tmp_path), "cuda:0") == "auto"
    assert compute_dtype("auto", str(tmp_path / "missing"), "cpu") == "auto"  # no config: the checkpoint's own


@pytest.mark.parametrize("streaming", ["auto", "off"])
def test_an_fp16_checkpoint_prunes_in_fp32_on_a_cpu_and_stays_fp16(tmp_path, streaming):
    save_random_model(tmp_path / "dense", dtype=torch.float16)
    manifest = prune(str(tmp_path / "dense"), tmp_path / "pruned", method="sparsegpt", pattern="2:4",
                     calib=str(ALPACA), nsamples=2, seqlen=32, device="cpu", streaming=streaming)
    assert manifest["config"]["dtype"] == "auto"  # what was asked; what was applied beside it
    assert manifest["applied"]["dtype"] == {"compute": "float32", "stored": "float16"}
    with safe_open(str(tmp_path / "pruned" / "model.safetensors"), "pt") as stored:
        assert {stored.get_tensor(name).dtype for name in stored.keys()} == {torch.float16}


def test_a_bf16_checkpoint_prunes_in_fp32_on_a_cpu_without_bf16_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(prune_stage, "_cpu_has_bf16", lambda: False)
    save_random_model(tmp_path / "dense", dtype=torch.bfloat16)
    manifest = prune(str(tmp_path / "dense"), tmp_path / "pruned", method="wanda", sparsity=0.5,
                     calib=str(ALPACA), nsamples=2, seqlen=32, device="cpu")
    assert manifest["applied"]["dtype"] == {"compute": "float32", "stored": "bfloat16"}

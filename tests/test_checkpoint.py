"""Checkpoints: atomic saves, the manifest's hashes, and loading guards."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import random_model, save_random_model, tiny_tokenizer

from spp_cli.errors import BadInput
from spp_cli.io import checkpoint
from spp_cli.io.manifest import layer_record, zeros_sha256


def test_zeros_sha256_changes_when_one_weight_is_unzeroed():
    weight = torch.randn(8, 16)
    weight[weight.abs() < 0.5] = 0
    before = zeros_sha256(weight)
    assert zeros_sha256(weight.clone()) == before
    assert zeros_sha256(weight.half()) == before  # the zero set, not the dtype
    revived = weight.clone()
    revived[(weight == 0).nonzero()[0].tolist()] = 1e-3
    assert zeros_sha256(revived) != before
    record = layer_record(weight)
    assert record["shape"] == [8, 16] and record["sparsity"] == round(float((weight == 0).float().mean()), 6)


def test_manifest_hash_ignores_time_and_location_but_not_content():
    manifest = {"stage": "prune", "parent": {"path": "/a", "manifest_sha256": None}, "method": "wanda", "layers": {}}
    first = checkpoint.finish_manifest(manifest, seconds=1.0)
    moved = checkpoint.finish_manifest({**manifest, "parent": {"path": "/b", "manifest_sha256": None}}, seconds=9.0)
    assert first["manifest_sha256"] == moved["manifest_sha256"]
    changed = checkpoint.finish_manifest({**manifest, "method": "sparsegpt"}, seconds=1.0)
    assert changed["manifest_sha256"] != first["manifest_sha256"]
    assert checkpoint.manifest_sha256(first) == first["manifest_sha256"]


def test_save_is_atomic_and_complete(tmp_path):
    model, tokenizer = random_model(), tiny_tokenizer()
    out = tmp_path / "out"
    manifest = checkpoint.save_checkpoint(model, tokenizer, out, {"stage": "test", "layers": {}})
    assert checkpoint.is_complete(out)
    assert json.loads((out / "spp.json").read_text())["manifest_sha256"] == manifest["manifest_sha256"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind
    loaded, _ = checkpoint.load_model(str(out))
    assert torch.equal(loaded.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)


def test_a_failed_save_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    model, tokenizer = random_model(), tiny_tokenizer()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", disk_full)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(model, tokenizer, tmp_path / "out", {"stage": "test", "layers": {}})
    assert list(tmp_path.iterdir()) == []


def test_kill_during_save_leaves_no_valid_looking_directory(tmp_path):
    """kill -9 while the weights are being written: the target never appears; only a hidden staging dir."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from tiny_models import random_model, tiny_tokenizer
        from spp_cli.io import checkpoint
        model = random_model()
        original = type(model).save_pretrained
        def slow_save(self, *a, **k):
            original(self, *a, **k)
            print("weights written", flush=True)
            time.sleep(60)
        type(model).save_pretrained = slow_save
        checkpoint.save_checkpoint(model, tiny_tokenizer(), {str(tmp_path / "out")!r}, {{"stage": "t", "layers": {{}}}})
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    lines = iter(process.stdout.readline, "")  # a library may print before (deepspeed's accelerator line)
    assert "weights written" in (line.strip() for line in lines)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "out").exists()
    assert not checkpoint.is_complete(tmp_path / "out")


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "has no config.json"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")), "has a config but no weights"),
        (
            lambda d: (d.mkdir(), (d / "config.json").write_text("{}"), (d / "pytorch_model.bin").write_bytes(b"x")),
            "only pickle .bin weights",
        ),
    ],
)
def test_unusable_model_directories_are_bad_input(tmp_path, setup, message):
    directory = tmp_path / "model"
    setup(directory)
    with pytest.raises(BadInput, match=message):
        checkpoint.load_model(str(directory))


def test_truncated_safetensors_is_bad_input(random_model_dir):
    weights = random_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(BadInput, match="is truncated"):
        checkpoint.load_model(str(random_model_dir))


def test_stored_dtype_is_kept_when_computing_in_float32(tmp_path):
    directory = tmp_path / "half"
    save_random_model(directory, dtype=torch.float16)
    model, _ = checkpoint.load_model(str(directory), dtype="float32")
    assert next(model.parameters()).dtype == torch.float32 and model.spp_stored_dtype == torch.float16


def test_a_damaged_distillation_record_hashes_without_a_traceback():
    """A user's spp.json with a distillation record but no teacher mapping is hashed (and so found not to be spp's
    by its sha) instead of raising KeyError; the teacher's path is left out of the hash as the parent's is."""
    assert len(checkpoint.manifest_sha256({"distillation": {}, "stage": "finetune"})) == 64
    with_path = {"distillation": {"teacher": {"path": "/a", "manifest_sha256": "x"}, "temperature": 1.0}}
    moved = {"distillation": {"teacher": {"path": "/b", "manifest_sha256": "x"}, "temperature": 1.0}}
    assert checkpoint.manifest_sha256(with_path) == checkpoint.manifest_sha256(moved)


def test_the_stored_dtype_comes_from_the_config_not_the_compute_dtype(tmp_path):
    """A checkpoint stored in fp16 and loaded in fp32 (auto on a CPU) is saved back in fp16."""
    directory = save_random_model(tmp_path / "m", dtype=torch.float16)
    model, _ = checkpoint.load_model(str(directory), dtype="float32", with_tokenizer=False)
    assert next(model.parameters()).dtype == torch.float32 and model.spp_stored_dtype == torch.float16
    assert checkpoint.config_dtype_name(str(directory)) == "float16"

"""The streaming merge (spp_cli/stages/merge_streaming.py): `spp merge` writes the in-memory merge's bytes for every
method on the shipped model, a 3-shard model with tied embeddings, Gemma3, Qwen2 (biases: IA3 scales them) and the
fused-MoE Mixtral and Qwen3-MoE; a kill -9 leaves nothing that looks complete and a rerun finishes the output."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO
from tiny_models import save_random_model

from spp_cli.adapters import adapter_class
from spp_cli.adapters.base import split_fused_experts
from spp_cli.errors import BadInput, CheckFailed
from spp_cli.io import atomic, checkpoint
from spp_cli.io.ownership import RECORD, read_record
from spp_cli.stages.merge import merge_adapter
from spp_cli.stages.prune import prune

METHODS = ("spp", "masked-lora", "lora", "ia3", "masked-full")
# architecture, what differs from tiny_models.BASE, dtype on disk, input shard size
MODELS = {
    # 5 MB: input shards of 1 MB make the pruned model's shards (and the merge's) of 2 MB, three of them
    "llama-tied-3-shards": ("llama", {"tie_word_embeddings": True, "vocab_size": 2048, "hidden_size": 128,
                                      "intermediate_size": 256, "num_hidden_layers": 6}, torch.float32, "1MB"),
    "gemma3-bf16": ("gemma3", {"sliding_window": 16, "query_pre_attn_scalar": 16}, torch.bfloat16, "5GB"),
    "qwen2-biases": ("qwen2", {"tie_word_embeddings": False}, torch.float32, "5GB"),
    "mixtral": ("mixtral", {"num_key_value_heads": 2, "tie_word_embeddings": False}, torch.float32, "5GB"),
    "qwen3_moe-bf16": ("qwen3_moe", {"num_key_value_heads": 2}, torch.bfloat16, "5GB"),
}
CASES = [("builtin", method) for method in METHODS] + [
    ("llama-tied-3-shards", "spp"), ("llama-tied-3-shards", "lora"), ("llama-tied-3-shards", "masked-full"),
    ("gemma3-bf16", "spp"), ("gemma3-bf16", "masked-lora"), ("gemma3-bf16", "ia3"), ("qwen2-biases", "ia3"),
    ("mixtral", "spp"), ("mixtral", "masked-full"), ("mixtral", "lora"), ("qwen3_moe-bf16", "spp"),
    ("qwen3_moe-bf16", "ia3"),
]


def pruned_model(root: Path, name: str) -> Path:
    """`name` of MODELS (or the shipped model) pruned by magnitude to 50% into root/pruned (in-memory prune)."""
    if name == "builtin":
        model = "builtin:tiny-llama"
    else:
        arch, options, dtype, shard = MODELS[name]
        model = str(save_random_model(root / "dense", arch, 0, dtype, shard, **options))
    prune(model, root / "pruned", method="magnitude", sparsity=0.5, streaming="off")
    return root / "pruned"


def random_adapter(pruned: Path, method: str, adapter_dir: Path, seed: int = 1) -> Path:
    """An adapter of `method` on `pruned` with random (nonzero) trained tensors, saved as finetune --no-merge does."""
    model, _ = checkpoint.load_model(str(pruned), dtype="float32", with_tokenizer=False)
    manifest = checkpoint.read_manifest(pruned)
    adapter = adapter_class(method).from_options(SimpleNamespace())
    targets = list(manifest["layers"])
    if not adapter.adapts_fused_experts:
        targets = split_fused_experts(model, targets)[0]
    adapted = adapter.inject(model, targets)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in (p for p in adapted.parameters() if p.requires_grad):
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    adapter.after_optimizer_step(adapted)  # masked-full: the mask again
    adapter.save(adapted, adapter_dir, base_path=str(pruned.resolve()),
                 base_manifest_sha256=manifest["manifest_sha256"])
    return adapter_dir


def assert_same_output(streamed: Path, in_memory: Path) -> None:
    """Every file byte for byte (adapter/ too), spp.json's text equal but for its timings, the same files recorded."""
    names = sorted(str(p.relative_to(in_memory)) for p in in_memory.rglob("*"))
    assert sorted(str(p.relative_to(streamed)) for p in streamed.rglob("*")) == names
    for name in names:
        ours, theirs = streamed / name, in_memory / name
        if ours.is_dir():
            continue
        if name == RECORD:
            assert set(read_record(streamed)) == set(read_record(in_memory))
        elif name == "spp.json":
            untimed = [{k: v for k, v in json.loads(p.read_text()).items() if k not in ("seconds", "created")}
                       for p in (ours, theirs)]
            assert json.dumps(untimed[0], indent=2) == json.dumps(untimed[1], indent=2)  # key order too
        else:
            assert ours.read_bytes() == theirs.read_bytes(), name


@pytest.mark.parametrize(("model", "method"), CASES, ids=[f"{m}-{method}" for m, method in CASES])
def test_streaming_merge_writes_the_in_memory_merge_byte_for_byte(tmp_path, model, method):
    pruned = pruned_model(tmp_path, model)
    adapter = random_adapter(pruned, method, tmp_path / "tuned" / "adapter")
    in_memory = merge_adapter(adapter, tmp_path / "memory", streaming="off")
    events = []
    streamed = merge_adapter(adapter, tmp_path / "stream", streaming="on", on_event=events.append)
    assert_same_output(tmp_path / "stream", tmp_path / "memory")
    assert streamed["manifest_sha256"] == in_memory["manifest_sha256"]
    assert events and events[-1].payload["done"] == events[-1].payload["total"]
    parent = checkpoint.read_manifest(pruned)["layers"]
    changed = [name for name, layer in streamed["layers"].items() if layer["weight_sha256"] != parent[name][
        "weight_sha256"]]
    adapted = [name for name in parent if adapter_class(method).adapts_fused_experts or ".experts." not in name]
    assert changed == adapted  # every adapted layer changed, no other (the frozen experts of some methods)
    assert not atomic.work_dir(tmp_path / "stream").exists()
    assert ("shards" in model) == (len(list((tmp_path / "stream").glob("*.safetensors"))) == 3)

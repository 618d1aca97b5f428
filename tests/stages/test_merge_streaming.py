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


def assert_same_output(streamed: Path, in_memory: Path, timings: str = "") -> None:
    """Every file byte for byte (adapter/ too), spp.json's text equal but for its timings, the same files recorded;
    a file named `timings` only exists in both."""
    names = sorted(str(p.relative_to(in_memory)) for p in in_memory.rglob("*"))
    assert sorted(str(p.relative_to(streamed)) for p in streamed.rglob("*")) == names
    for name in names:
        ours, theirs = streamed / name, in_memory / name
        if ours.is_dir() or ours.name == timings:
            continue
        if ours.name == RECORD:  # the record of what spp wrote: the same files, their own sizes and times
            assert set(read_record(ours.parent)) == set(read_record(theirs.parent))
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
    streamed = merge_adapter(adapter, tmp_path / "stream", streaming="on",
                             on_event=lambda event: events.append(event) if event.kind == "progress" else None)
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


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_merges_through_merged_layer_exactly_as_merge_and_unload(method, dtype):
    """LoRA and IA3 merge with their own formula (Adapter.merged_layer, the streaming merge's): PEFT's bits."""
    from tiny_models import random_model

    from spp_cli.adapters.base import default_targets

    results = []
    for merge in ("ours", "peft"):
        model = random_model("qwen2", dtype=dtype)  # q/k/v biases: IA3 scales them
        adapter = adapter_class(method).from_options(SimpleNamespace())
        adapted = adapter.inject(model, default_targets(model, {"layers": {n: {} for n in (
            "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj")}}))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in (p for p in adapted.parameters() if p.requires_grad):
                parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.3)
        merged = adapter.merge(adapted) if merge == "ours" else adapted.merge_and_unload()
        results.append(merged.state_dict())
    ours, peft = results
    assert list(ours) == list(peft)
    for name in ours:
        assert torch.equal(ours[name], peft[name]), name


def test_kill_9_during_a_streaming_merge_leaves_nothing_complete_and_a_rerun_finishes_it(tmp_path):
    pruned = pruned_model(tmp_path, "llama-tied-3-shards")
    adapter = random_adapter(pruned, "spp", tmp_path / "tuned" / "adapter")
    whole = merge_adapter(adapter, tmp_path / "whole", streaming="off")
    out = tmp_path / "killed"
    script = (  # resume.json after every tensor; SIGKILL once 20 of them are written
        "import os, signal\n"
        "from spp_cli.stages import merge_streaming\n"
        "from spp_cli.stages.merge import merge_adapter\n"
        "merge_streaming.SAVE_EVERY_BYTES = 0\n"
        "def on_event(event):\n"
        "    if event.kind == 'progress' and event.payload['done'] == 20:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"merge_adapter({str(adapter)!r}, {str(out)!r}, on_event=on_event)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and not checkpoint.is_complete(atomic.work_dir(out))
    state = json.loads((atomic.work_dir(out) / "resume.json").read_text())
    assert state["next_unit"] == 20

    seen = []
    resumed = merge_adapter(adapter, out, on_event=lambda event: seen.append(event.payload["done"])
                            if event.kind == "progress" else None)
    assert seen[0] == 21 and seen[-1] == len(seen) + 20  # only what the killed run had not written
    assert resumed["manifest_sha256"] == whole["manifest_sha256"]
    assert_same_output(out, tmp_path / "whole")
    assert not atomic.work_dir(out).exists()


def test_streaming_falls_back_to_memory_unless_it_is_on(tmp_path):
    pruned = pruned_model(tmp_path, "builtin")
    adapter = random_adapter(pruned, "masked-lora", tmp_path / "tuned" / "adapter")
    manifest = json.loads((pruned / "spp.json").read_text())
    (pruned / "spp.json").write_text(json.dumps({**manifest, "layers": {}}))  # the pruned layers are not listed
    with pytest.raises(BadInput, match="--streaming on cannot merge this model tensor by tensor: its spp.json"):
        merge_adapter(adapter, tmp_path / "on", streaming="on")
    with pytest.raises(BadInput, match="streaming: 'sometimes' is not one of auto, on, off"):
        merge_adapter(adapter, tmp_path / "on", streaming="sometimes")
    assert not (tmp_path / "on").exists() and not atomic.work_dir(tmp_path / "on").exists()


def test_spp_merge_streaming_on_and_off_write_the_same_bytes_and_on_refuses_in_one_line(tmp_path, capsys):
    """`spp merge --streaming on|off` (merge_adapter's streaming): the same output; on, for a base whose spp.json
    lists no layers, is exit 2 with one line and nothing written."""
    from conftest import run_spp

    pruned = pruned_model(tmp_path, "builtin")
    adapter = random_adapter(pruned, "masked-lora", tmp_path / "tuned" / "adapter")
    for streaming in ("off", "on"):
        code, _, err = run_spp(["merge", adapter, "--out", tmp_path / streaming, "--streaming", streaming], capsys)
        assert code == 0, err
    assert_same_output(tmp_path / "on", tmp_path / "off")
    manifest = json.loads((pruned / "spp.json").read_text())
    (pruned / "spp.json").write_text(json.dumps({**manifest, "layers": {}}))
    code, _, err = run_spp(["merge", adapter, "--out", tmp_path / "refused", "--streaming", "on"], capsys)
    assert code == 2 and err.splitlines()[-1].startswith("spp: error: --streaming on cannot merge this model"), err
    assert [line for line in err.splitlines() if line.startswith("spp: error")] == [err.splitlines()[-1]]
    assert not (tmp_path / "refused").exists() and not atomic.work_dir(tmp_path / "refused").exists()


def test_an_adapter_whose_shapes_do_not_fit_the_base_is_one_line_exit_2_before_anything_is_written(tmp_path, capsys):
    """Every method, streaming and in memory: an adapter tensor a column short (as an adapter of another model's
    shapes) is found by its shape in the file's header before any merging: exit 2, one line naming the layer, both
    shapes and the fix, nothing left."""
    from conftest import run_spp
    from safetensors.torch import load_file, save_file

    pruned = pruned_model(tmp_path, "builtin")
    for method in METHODS:
        adapter = random_adapter(pruned, method, tmp_path / method / "adapter")
        weights = load_file(adapter / "adapter_model.safetensors")
        key = sorted(weights)[0]  # one tensor of the first layer, a column short
        weights[key] = weights[key][..., :-1].contiguous() if weights[key].dim() > 1 else weights[key][:-1].clone()
        save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
        for streaming in ("on", "off"):
            out = tmp_path / f"{method}-{streaming}"
            capsys.readouterr()
            code, _, err = run_spp(["merge", adapter, "--out", out, "--streaming", streaming], capsys)
            assert code == 2 and "Traceback" not in err, (method, streaming, err)
            *before, error = err.splitlines()  # the plan, then one error line: no tensor was merged
            assert all(line.startswith("spp: plan: ") for line in before), (method, streaming, err)
            assert error.startswith(f"spp: error: adapter {adapter / 'adapter_model.safetensors'} does not fit this "
                                    "base: layer "), (method, streaming, err)
            assert "do not fit its weight [" in error and f" {list(weights[key].shape)}" in error, error
            assert error.endswith("merge it into the model it was trained on"), error
            assert not out.exists() and not atomic.work_dir(out).exists()


def test_a_base_whose_zeros_differ_is_refused_and_a_lost_zero_fails_with_nothing_left(tmp_path):
    from safetensors.torch import load_file, save_file

    pruned = pruned_model(tmp_path, "builtin")
    adapter = random_adapter(pruned, "masked-full", tmp_path / "tuned" / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    layer = next(iter(config["base_zeros_sha256"]))
    changed = dict(config, base_zeros_sha256={**config["base_zeros_sha256"], layer: "0" * 64})
    (adapter / "adapter_config.json").write_text(json.dumps(changed))
    with pytest.raises(BadInput, match=f"does not fit this base: layer {layer} has a different zero mask"):
        merge_adapter(adapter, tmp_path / "refused", streaming="on")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(adapter / "adapter_model.safetensors")  # masked-full's state is the weights: revive zeros
    weights = {key: torch.ones_like(tensor) for key, tensor in weights.items()}
    save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    merged = merge_adapter(adapter, tmp_path / "ones", streaming="on")  # the mask applies: no zero is lost
    assert all(layer["sparsity"] >= 0.5 for layer in merged["layers"].values())
    for out in ("refused", "ones"):
        assert not atomic.work_dir(tmp_path / out).exists()
    assert not (tmp_path / "refused").exists()


def test_a_merge_that_loses_a_zero_fails_and_leaves_nothing(tmp_path, monkeypatch):
    from spp_cli.adapters.spp import SPPAdapter

    pruned = pruned_model(tmp_path, "builtin")
    adapter = random_adapter(pruned, "spp", tmp_path / "tuned" / "adapter")
    monkeypatch.setattr(SPPAdapter, "merged_layer", lambda self, layer, weight, bias, tensors: (weight + 1, bias))
    with pytest.raises(CheckFailed, match="the merge lost zeros in 28 layers"):
        merge_adapter(adapter, tmp_path / "lost", streaming="on")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pruned", "tuned"]


@pytest.mark.parametrize("method", ["spp", "lora"])
def test_finetune_merges_streaming_into_the_in_memory_merge_s_bytes(tmp_path, monkeypatch, method):
    from tiny_models import ALPACA

    from spp_cli.stages import finetune as finetune_stage
    from spp_cli.stages import finetune_merge, merge_streaming

    pruned = pruned_model(tmp_path, "builtin")
    train = dict(data=str(ALPACA), method=method, max_steps=2, batch_size=4, micro_batch_size=4, seqlen=32,
                 val_size=0, device="cpu")
    opened = []
    monkeypatch.setattr(merge_streaming.StreamingMerge, "_open", lambda self, _open=merge_streaming.StreamingMerge.
                        _open: (opened.append(self.staging), _open(self))[1])
    streamed = finetune_stage.finetune(str(pruned), tmp_path / "stream", **train)
    assert opened == [atomic.work_dir(tmp_path / "stream") / "merged"]
    monkeypatch.setattr(finetune_merge, "_streaming_merge", lambda plan, base, result, merge_input: None)
    in_memory = finetune_stage.finetune(str(pruned), tmp_path / "memory", **train)
    assert_same_output(tmp_path / "stream", tmp_path / "memory", timings="run.json")
    assert streamed["manifest_sha256"] == in_memory["manifest_sha256"]
    assert not atomic.work_dir(tmp_path / "stream").exists()


@pytest.mark.parametrize(("model", "method"), [("builtin", "lora"), ("mixtral", "spp")])
def test_rank_0_saves_and_merges_on_a_weightless_base_the_bytes_of_the_full_reload(tmp_path, monkeypatch, model,
                                                                                   method):
    """After a multi-process run (simulated: the world is 2 once training returns) rank 0 puts the gathered
    adapters on a weightless base: the adapter files and the merged output are those of the full reload. PEFT's
    save, and SPP's fused experts (a parametrization over a meta original); SPP on linears runs for real under
    torchrun in tests/test_faults.py."""
    from tiny_models import ALPACA

    from spp_cli.stages import finetune as finetune_stage
    from spp_cli.training import result as training_result
    from spp_cli.training import trainer

    pruned = pruned_model(tmp_path, model)
    train = dict(data=str(ALPACA), method=method, max_steps=2, batch_size=4, micro_batch_size=4, seqlen=32,
                 val_size=0, device="cpu")
    one_process, trained = trainer.world_size, finetune_stage.train
    monkeypatch.setattr(finetune_stage, "train", lambda *args: (
        trained(*args), monkeypatch.setattr(trainer, "world_size", lambda: 2))[0])
    reloads = []
    monkeypatch.setattr(training_result, "adapted_copy", lambda base, result, _copy=training_result.adapted_copy: (
        reloads.append(base), _copy(base, result))[1])
    weightless = finetune_stage.finetune(str(pruned), tmp_path / "weightless", **train)
    assert reloads == []
    monkeypatch.setattr(trainer, "world_size", one_process)
    # the full reload as before: the parent's weights loaded whole on the CPU under the adapters
    monkeypatch.setattr(training_result, "adapted_weightless", lambda skeleton, result: training_result.adapted_copy(
        checkpoint.load_model(str(pruned), dtype="float32", with_tokenizer=False)[0], result))
    reloaded = finetune_stage.finetune(str(pruned), tmp_path / "reloaded", **train)
    assert len(reloads) == 1
    assert_same_output(tmp_path / "weightless", tmp_path / "reloaded", timings="run.json")
    assert weightless["manifest_sha256"] == reloaded["manifest_sha256"]

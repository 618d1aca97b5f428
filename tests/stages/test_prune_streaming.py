"""The streaming prune (spp_cli/stages/prune_streaming.py): the same bytes as the in-memory path, resume at the
block after a kill, never a resume across changed options or inputs, and one line for incomplete shards."""

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_spp
from safetensors.torch import load_file, save_file
from tiny_models import save_random_model

from spp_cli.errors import BadInput
from spp_cli.io.ownership import RECORD, read_record
from spp_cli.stages.prune import prune
from spp_cli.stages.prune_streaming import staging_path

CALIB = {"calib": "builtin:python-docs:train", "nsamples": 4, "seqlen": 32, "device": "cpu"}


# each model's architecture and what differs from tiny_models.BASE
SIZES = {"intermediate_size": 96, "num_hidden_layers": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
MODELS = {
    "llama": ("llama", {"tie_word_embeddings": True}),  # tied embeddings: lm_head is not saved
    # 9 MB in fp32: input shards of 1 MB make output shards of 2 MB, an index
    "llama-wide": ("llama", {"vocab_size": 4096, "hidden_size": 128, "intermediate_size": 256}),
    # q/k/v biases, sliding-window layers from block 2 on
    "qwen2": ("qwen2", {"tie_word_embeddings": False, "use_sliding_window": True, "sliding_window": 16,
                        "max_window_layers": 2}),
    "gemma2": ("gemma2", {"sliding_window": 16, "query_pre_attn_scalar": 16}),
}


def save_random(directory: Path, name: str, dtype=torch.float32, shard: str = "5GB", seed: int = 0) -> Path:
    """A random-init model `name` of MODELS saved to `directory` (with a tokenizer), in `dtype`, sharded at
    `shard`."""
    arch, options = MODELS[name]
    return save_random_model(directory, arch, seed, dtype, shard, **{**SIZES, **options})


def assert_same_output(streamed: Path, in_memory: Path) -> None:
    """Every file byte for byte, spp.json equal except its timings, and the same files in the ownership record."""
    names = sorted(path.name for path in in_memory.iterdir())
    assert sorted(path.name for path in streamed.iterdir()) == names
    for name in names:
        if name == RECORD:  # the record of what spp wrote: the same files, their own sizes and times
            assert set(read_record(streamed)) == set(read_record(in_memory))
        elif name == "spp.json":
            ours, theirs = (json.loads((d / name).read_text()) for d in (streamed, in_memory))
            for key in ("seconds", "created"):
                ours.pop(key), theirs.pop(key)
            assert ours == theirs
        else:
            assert (streamed / name).read_bytes() == (in_memory / name).read_bytes(), name


CASES = {
    "tiny-wanda": ("builtin", "wanda", {"sparsity": 0.5}),
    "tiny-sparsegpt-dsnot": ("builtin", "sparsegpt", {"sparsity": 0.5, "refine": "dsnot"}),
    "tiny-sparsegpt-2:4-float32": ("builtin", "sparsegpt", {"pattern": "2:4", "dtype": "float32"}),
    "llama-tied-bf16-sparsegpt": ("llama", "sparsegpt", {"sparsity": 0.6, "true_sequential": True}),
    "qwen2-wanda-targets-bfloat16": ("qwen2", "wanda", {"sparsity": 0.5, "targets": r"layers\.[12]\.mlp",
                                                        "dtype": "bfloat16"}),  # fp32 stored: a lossy round trip
    "gemma2-magnitude": ("gemma2", "magnitude", {"sparsity": 0.5}),
    "llama-wide-output-shards-magnitude": ("llama-wide", "magnitude", {"sparsity": 0.5}),
}


@pytest.mark.parametrize("case", CASES)
def test_streaming_writes_the_in_memory_checkpoint_byte_for_byte(tmp_path, case):
    arch, method, options = CASES[case]
    if arch == "builtin":
        model = "builtin:tiny-llama"
    else:
        model = str(save_random(tmp_path / arch, arch, torch.bfloat16 if "bf16" in case else torch.float32,
                                shard="1MB" if "wide" in case else "60KB"))  # checkpoint.parent_shard_size
        assert len(list(Path(model).glob("*.safetensors"))) > 2  # makes the output's from these
    calib = {} if method == "magnitude" else CALIB
    in_memory = prune(model, tmp_path / "memory", method=method, streaming="off", **calib, **options)
    streamed = prune(model, tmp_path / "stream", method=method, streaming="on", **calib, **options)
    assert_same_output(tmp_path / "stream", tmp_path / "memory")
    assert ("output-shards" in case) == (tmp_path / "stream" / "model.safetensors.index.json").is_file()
    assert streamed["layers"] == in_memory["layers"] and len(streamed["layers"]) > 0
    assert not staging_path(tmp_path / "stream").exists()


class Crash(Exception):
    pass


def crash_after(block: int):
    def on_event(event):
        if event.kind == "block" and event.payload.index == block:
            raise Crash
    return on_event


def blocks_into(seen: list):
    """A listener keeping the index of every pruned block (the "note" events are not blocks)."""
    return lambda event: seen.append(event.payload.index) if event.kind == "block" else None


def test_kill_9_after_block_2_of_4_resumes_at_block_2_bit_identically(tmp_path):
    model = str(save_random(tmp_path / "llama", "llama", shard="60KB"))
    options = dict(method="sparsegpt", sparsity=0.5, **CALIB)
    whole = prune(model, tmp_path / "whole", **options)
    out = tmp_path / "killed"
    script = (  # block 1 is the second of four: SIGKILL from its report hook, after its state is saved
        "import os, signal, sys\n"
        "from spp_cli.stages.prune import prune\n"
        "def on_event(event):\n"
        "    if event.kind == 'block' and event.payload.index == 1:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"prune({model!r}, {str(out)!r}, on_event=on_event, **{options!r})\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            # the same thread count as this process: SparseGPT's float sums depend on it
                            env={**os.environ, "PYTHONPATH": str(REPO),
                                 "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    state = json.loads((staging_path(out) / "resume.json").read_text())
    assert (state["next_block"], state["done_blocks"]) == (2, [0, 1])

    seen = []
    resumed = prune(model, out, on_event=blocks_into(seen), **options)
    assert resumed["resumed_from_block"] == 2 and seen == [2, 3]
    assert {name: layer["weight_sha256"] for name, layer in resumed["layers"].items()} == {
        name: layer["weight_sha256"] for name, layer in whole["layers"].items()
    }
    assert len(resumed["layers"]) == 4 * 7
    assert resumed["manifest_sha256"] == whole["manifest_sha256"]
    assert_same_output(out, tmp_path / "whole")


def test_a_resumed_prune_says_where_it_resumes_and_which_blocks_it_kept(tmp_path, capsys):
    model = str(save_random(tmp_path / "llama", "llama"))
    options = dict(method="wanda", sparsity=0.5, **CALIB)
    with pytest.raises(Crash):
        prune(model, tmp_path / "out", on_event=crash_after(1), **options)
    work = tmp_path / ".out.spp-work"
    assert staging_path(tmp_path / "out") == work and (work / "resume.json").is_file()
    capsys.readouterr()  # what saving the random model printed
    code, out, err = run_spp(["prune", model, "--method", "wanda", "--sparsity", "0.5", "--calib", CALIB["calib"],
                              "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--out", tmp_path / "out"],
                             capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if not line.startswith("spp: plan: ")]
    assert lines[0] == f"spp: resuming at block 3 of 4 (blocks 1-2 kept from the interrupted run at {work})"
    assert [line.split(":")[0] for line in lines[1:]] == ["  block 3/4", "  block 4/4"]
    assert "  resumed: blocks 1-2 were pruned by the interrupted run" in out.splitlines()
    with pytest.raises(Crash):  # a resume at block 2 keeps one block
        prune(model, tmp_path / "one", on_event=crash_after(0), **options)
    events = []
    resumed = prune(model, tmp_path / "one", on_event=events.append, **options)
    assert events[0].kind == "plan"  # the memory plan (tests/test_memory_plan.py)
    events = events[1:]
    assert events[0].kind == "note" and events[0].payload.startswith("resuming at block 2 of 4 (block 1 kept from")
    assert [event.kind for event in events[1:]] == ["block"] * 3 and resumed["resumed_from_block"] == 1
    with pytest.raises(Crash):  # killed after its last block, before the output was complete
        prune(model, tmp_path / "all", on_event=crash_after(3), **options)
    events = []
    prune(model, tmp_path / "all", on_event=events.append, **options)
    assert [event.payload for event in events if event.kind != "plan"] == [
        f"resuming after the last block (all 4 kept from the interrupted run at {tmp_path / '.all.spp-work'})"]


@pytest.mark.parametrize("change", ["option", "input model"])
def test_a_changed_option_or_input_never_resumes(tmp_path, change):
    model = save_random(tmp_path / "llama", "llama")
    options = dict(method="wanda", sparsity=0.5, **CALIB)
    with pytest.raises(Crash):
        prune(str(model), tmp_path / "out", on_event=crash_after(1), **options)
    assert json.loads((staging_path(tmp_path / "out") / "resume.json").read_text())["next_block"] == 2
    if change == "option":
        options["sparsity"] = 0.6
    else:  # the same path, other weights
        save_random(model, "llama", seed=1)
    seen = []
    rerun = prune(str(model), tmp_path / "out", on_event=blocks_into(seen), **options)
    fresh = prune(str(model), tmp_path / "fresh", **options)
    assert "resumed_from_block" not in rerun and seen == [0, 1, 2, 3]
    assert rerun["manifest_sha256"] == fresh["manifest_sha256"]
    assert_same_output(tmp_path / "out", tmp_path / "fresh")


def test_a_staging_dir_held_by_a_live_run_is_never_used(tmp_path):
    model = save_random(tmp_path / "llama", "llama")
    staging = staging_path(tmp_path / "out")
    staging.mkdir()
    with (staging / "lock").open("a") as held:  # another process is writing this output
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BadInput, match="another spp prune is writing"):
            prune(str(model), tmp_path / "out", method="magnitude", sparsity=0.5)
    assert not (tmp_path / "out").exists()


def test_shards_missing_a_block_tensor_are_one_line_and_nothing_is_written(tmp_path):
    model = save_random(tmp_path / "llama", "llama")
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.2.mlp.down_proj.weight"]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInput) as error:
        prune(str(model), tmp_path / "out", method="wanda", sparsity=0.5, **CALIB)
    message = str(error.value)
    assert "\n" not in message
    assert "'model.layers.2.mlp.down_proj.weight' (block 2 of 4)" in message and "re-save" in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llama"]


def test_streaming_on_needs_a_local_safetensors_directory(tmp_path):
    with pytest.raises(BadInput, match="--streaming on needs a local model directory"):
        prune("org/not-downloaded", tmp_path / "out", method="magnitude", sparsity=0.5, streaming="on")
    with pytest.raises(BadInput, match="streaming: 'sometimes' is not one of auto, on, off"):
        prune("builtin:tiny-llama", tmp_path / "out", method="magnitude", sparsity=0.5, streaming="sometimes")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_planned_shards_are_save_pretrained_s_files_byte_for_byte(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from spp_cli.stages.prune_streaming import open_streamed_model
    from spp_cli.stages.streamed_checkpoint import ShardWriter, plan_output

    model_dir = save_random(tmp_path / arch, arch, torch.bfloat16)
    streamed = open_streamed_model(str(model_dir), "auto", False)
    plan = plan_output(streamed.model, torch.bfloat16, "60KB")  # small shards: many files and an index
    writer = ShardWriter(tmp_path / "written", plan)
    (tmp_path / "written").mkdir()
    writer.lay_out()
    for name in reversed(plan.tensors):  # any order
        writer.write({name: streamed.source.read([name])[name]})
    writer.write_index()
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(tmp_path / "saved", max_shard_size="60KB")
    saved = sorted(path.name for path in (tmp_path / "saved").glob("model*"))
    assert len(saved) > 3 and sorted(path.name for path in (tmp_path / "written").iterdir()) == saved
    for name in saved:
        assert (tmp_path / "written" / name).read_bytes() == (tmp_path / "saved" / name).read_bytes(), name


def counting_store_class(blocks):
    """(a StreamingStore subclass recording each load_block, the blocks loaded in order, and after each load the
    indices of the blocks holding weights)."""
    from spp_cli.stages.prune_streaming import StreamingStore

    loaded, holding = [], []

    class CountingStore(StreamingStore):
        def load_block(self, index, block):
            super().load_block(index, block)
            loaded.append(index)
            holding.append([i for i, b in enumerate(blocks) if not next(b.parameters()).is_meta])

    return CountingStore, loaded, holding


def test_the_driver_holds_one_block_at_a_time_and_loads_each_once(tmp_path):
    from pruners.masks import parse_pattern
    from pruners.sequential import PruneOptions, prune_model
    from spp_cli.stages.prune_streaming import open_streamed_model

    model_dir = save_random(tmp_path / "llama", "llama")
    streamed = open_streamed_model(str(model_dir), "auto", False)
    blocks = streamed.model.model.layers
    CountingStore, loaded, holding = counting_store_class(blocks)
    store = CountingStore(streamed, tmp_path / "out", "a fingerprint")
    store.open()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    reports = prune_model(streamed.model, ids, PruneOptions("wanda", parse_pattern("unstructured", 0.5)), store=store)
    assert loaded == [0, 1, 2, 3] and holding == [[0], [1], [2], [3]]
    assert all(next(b.parameters()).is_meta for b in blocks) and len(reports) == 28
    assert store.first_block == 4 and sorted(store.layers) == sorted(r.name for r in reports)
    store.close()


def test_shards_in_another_naming_fall_back_to_the_in_memory_path_unless_streaming_is_on(tmp_path):
    model = save_random(tmp_path / "llama", "llama")
    tensors = load_file(model / "model.safetensors")  # an older naming: what from_pretrained converts, if it can
    save_file({"transformer." + name: tensor for name, tensor in tensors.items()}, model / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(BadInput, match="--streaming on cannot write this model tensor by tensor: its shards name"):
        prune(str(model), tmp_path / "on", method="magnitude", sparsity=0.5, streaming="on")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llama"]
    manifest = prune(str(model), tmp_path / "auto", method="magnitude", sparsity=0.5)
    assert len(manifest["layers"]) == 28 and not staging_path(tmp_path / "auto").exists()


def _owl_inputs(model):
    """(blocks, per-block target linears, calibration ids (4, 16), batches of 1) for pruners.owl.owl_profile."""
    from pruners.blocks import find_decoder_blocks, prunable_linears

    prefix, blocks = find_decoder_blocks(model)
    per_block = [{} for _ in blocks]
    for name, linear in prunable_linears(model).items():
        per_block[int(name[len(prefix) + 1:].split(".")[0])][name] = linear
    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    return blocks, per_block, ids, [slice(i, i + 1) for i in range(4)]


def test_owl_dense_pass_through_a_store_holds_one_block_and_gives_the_in_memory_profile(tmp_path):
    from transformers import AutoModelForCausalLM

    from pruners.owl import owl_profile
    from spp_cli.stages.prune_streaming import open_streamed_model

    model_dir = save_random(tmp_path / "llama", "llama")
    dense = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = owl_profile(dense, *_owl_inputs(dense), torch.device("cpu"), 0.6)
    streamed = open_streamed_model(str(model_dir), "auto", False)
    blocks = streamed.model.model.layers
    CountingStore, loaded, holding = counting_store_class(blocks)
    store = CountingStore(streamed, tmp_path / "out", "a fingerprint")
    store.open()
    with torch.no_grad():
        profile = owl_profile(streamed.model, *_owl_inputs(streamed.model), torch.device("cpu"), 0.6, store=store)
    assert profile == expected and len(set(expected.sparsities)) == 3  # exactly equal floats; not uniform (blocks
    # 1 and 2 of this random model have the same outlier count)
    assert loaded == [0, 1, 2, 3] and holding == [[0], [1], [2], [3]]
    assert all(next(b.parameters()).is_meta for b in blocks)
    assert json.loads((staging_path(tmp_path / "out") / "resume.json").read_text())["owl_profile"] == {
        "outlier_ratios": expected.outlier_ratios, "sparsities": expected.sparsities}
    store.close()
    reopened = CountingStore(streamed, tmp_path / "out", "a fingerprint")  # a rerun of the same run: the kept
    reopened.open()  # profile, without a second dense pass
    assert owl_profile(streamed.model, *_owl_inputs(streamed.model), torch.device("cpu"), 0.6,
                       store=reopened) == expected and loaded == [0, 1, 2, 3]
    reopened.close()


@pytest.mark.parametrize("case", ["tiny-wanda", "tiny-magnitude", "llama-sharded-sparsegpt"])
def test_streamed_owl_writes_the_in_memory_checkpoint_byte_for_byte(tmp_path, case):
    model = "builtin:tiny-llama" if case == "tiny-wanda" else str(save_random(tmp_path / "llama", "llama",
                                                                              shard="60KB"))
    options = dict(method=case.rsplit("-", 1)[1], sparsity=0.6, sparsity_profile="owl", **CALIB)
    streamed_blocks = []

    notes = []

    def on_event(event):  # the streamed path: the staging dir exists while blocks are pruned
        if event.kind == "block":
            streamed_blocks.append(staging_path(tmp_path / "stream").is_dir())
        elif event.kind != "plan":
            notes.append(event.payload)

    in_memory = prune(model, tmp_path / "memory", streaming="off", **options)
    streamed = prune(model, tmp_path / "stream", streaming="auto", on_event=on_event, **options)
    assert streamed_blocks == [True] * 4
    assert notes == ["OWL: measuring the outlier ratio of all 4 blocks in a dense pass before the first block is "
                     "pruned"]
    assert_same_output(tmp_path / "stream", tmp_path / "memory")
    assert streamed["sparsity_profile"] == in_memory["sparsity_profile"]
    assert len(set(in_memory["sparsity_profile"]["layer_sparsity"].values())) > 1


def test_a_killed_streamed_owl_prune_resumes_with_its_kept_profile(tmp_path):
    model = str(save_random(tmp_path / "llama", "llama"))
    options = dict(method="wanda", sparsity=0.6, sparsity_profile="owl", **CALIB)
    whole = prune(model, tmp_path / "whole", streaming="off", **options)
    with pytest.raises(Crash):
        prune(model, tmp_path / "out", on_event=crash_after(1), **options)
    assert (staging_path(tmp_path / "out") / "resume.json").is_file()  # it was streamed
    state = json.loads((staging_path(tmp_path / "out") / "resume.json").read_text())
    assert state["next_block"] == 2 and [round(s, 8) for s in state["owl_profile"]["sparsities"]] == [
        whole["sparsity_profile"]["layer_sparsity"][str(i)] for i in range(4)]
    seen = []
    resumed = prune(model, tmp_path / "out", on_event=blocks_into(seen), **options)
    assert resumed["resumed_from_block"] == 2 and seen == [2, 3]
    assert resumed["sparsity_profile"] == whole["sparsity_profile"]  # every block, the killed run's included
    assert resumed["manifest_sha256"] == whole["manifest_sha256"]
    assert_same_output(tmp_path / "out", tmp_path / "whole")

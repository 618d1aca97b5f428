"""The streamed prune keeps block i on a writer thread while block i + 1 is computed (prune_streaming.StreamingStore,
streamed_checkpoint.BackgroundWriter): the two really overlap, a failure on the writer thread is the caller's error
(a full disk: the same one line and exit 3), and the rerun resumes after the last block kept."""

import errno
import json
import threading

import pytest
import torch
from conftest import run_spp
from tiny_models import save_random_model

from spp_cli.stages import streamed_checkpoint
from spp_cli.stages.prune import prune
from spp_cli.stages.prune_streaming import StreamingStore, open_streamed_model, staging_path
from spp_cli.stages.streamed_checkpoint import BackgroundWriter

WANDA = ["--method", "wanda", "--sparsity", "0.5", "--calib", "builtin:python-docs:train", "--nsamples", "2",
         "--seqlen", "16", "--device", "cpu"]


@pytest.fixture
def four_blocks(tmp_path):
    return save_random_model(tmp_path / "llama", num_hidden_layers=4)


def test_block_i_is_written_while_block_i_plus_1_is_computed(tmp_path, four_blocks, monkeypatch):
    from pruners.masks import parse_pattern
    from pruners.sequential import PruneOptions, prune_model

    next_loaded = threading.Event()
    seen = {}

    class Store(StreamingStore):
        def load_block(self, index, block):
            super().load_block(index, block)
            if index == 1:
                next_loaded.set()

    write = streamed_checkpoint.ShardWriter.write

    def slow_write(self, tensors):  # block 0's write waits until block 1 is loaded: only an overlap gets there
        if any(".layers.0." in name for name in tensors) and "block 0" not in seen:
            seen["block 0"] = (threading.current_thread() is not threading.main_thread(), next_loaded.wait(30))
        write(self, tensors)

    monkeypatch.setattr(streamed_checkpoint.ShardWriter, "write", slow_write)
    streamed = open_streamed_model(str(four_blocks), "auto", False)
    store = Store(streamed, tmp_path / "out", "a fingerprint")
    store.open()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    prune_model(streamed.model, ids, PruneOptions("wanda", parse_pattern("unstructured", 0.5)), store=store)
    assert seen["block 0"] == (True, True)  # on the writer thread, and block 1 was loaded meanwhile
    assert store.first_block == 4 and len(store.layers) == 28  # flushed when prune_model returned
    store.close()


def test_a_full_disk_on_the_writer_thread_is_the_same_one_line_and_the_rerun_resumes(tmp_path, four_blocks, capsys,
                                                                                    monkeypatch):
    whole = prune(str(four_blocks), tmp_path / "whole", method="wanda", sparsity=0.5,
                  calib="builtin:python-docs:train", nsamples=2, seqlen=16, device="cpu")
    write = streamed_checkpoint.ShardWriter.write

    def full_at_block_2(self, tensors):
        if any(".layers.2." in name for name in tensors):
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, tensors)

    monkeypatch.setattr(streamed_checkpoint.ShardWriter, "write", full_at_block_2)
    out = tmp_path / "pruned"
    code, _, err = run_spp(["prune", four_blocks, *WANDA, "--out", out], capsys)
    assert code == 3 and "Traceback" not in err and not out.exists()
    line = err.splitlines()[-1]
    assert line.startswith(f"spp: error: the disk is full while writing '{out}'; the resume folder "
                           f"'{staging_path(out)}' holds ")
    assert line.endswith(": free space on that disk (or choose another --out) and rerun")
    progress = [line for line in err.splitlines()[:-1] if not line.startswith("spp: plan: ")]
    assert [line.split(":")[0] for line in progress] == ["  block 1/4", "  block 2/4"]  # kept only
    state = json.loads((staging_path(out) / "resume.json").read_text())
    assert (state["next_block"], state["done_blocks"]) == (2, [0, 1])

    monkeypatch.setattr(streamed_checkpoint.ShardWriter, "write", write)  # space freed: the rerun resumes
    code, _, err = run_spp(["prune", four_blocks, *WANDA, "--out", out], capsys)
    assert code == 0, err
    assert err.splitlines()[0].startswith("spp: plan: ") and err.splitlines()[1].startswith(
        "spp: resuming at block 3 of 4")
    assert json.loads((out / "spp.json").read_text())["manifest_sha256"] == whole["manifest_sha256"]
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_the_background_writer_runs_in_order_and_raises_in_the_caller():
    jobs, done = BackgroundWriter(), []
    jobs.start(lambda: done.append(1))
    jobs.then(lambda: done.append(2))
    jobs.start(lambda: done.append(3))  # waits for 1 and 2 first
    jobs.wait()
    assert done == [1, 2, 3]

    def fail():
        raise OSError(errno.ENOSPC, "No space left on device")

    jobs.start(fail)
    jobs.then(lambda: done.append(4))  # skipped: a job before it failed
    with pytest.raises(OSError, match="No space left"):
        jobs.start(lambda: done.append(5))
    jobs.wait()
    assert done == [1, 2, 3]
    jobs.start(fail)
    jobs.close()  # quiet: the caller is already failing, or waited

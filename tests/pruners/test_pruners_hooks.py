"""The driver's hook interface (pruners/hooks.py): when each method runs, and what a hook may read and change --
what a block-wise reconstruction hook needs (the block's inputs, the dense outputs, weights changed after pruning
and before the pruned pass)."""

import copy

import torch
import transformers

from pruners import parse_pattern
from pruners.blocks import block_outputs
from pruners.hooks import PruneHook
from pruners.sequential import PruneOptions, prunable_linears, prune_model

VOCAB, SEQLEN, NSAMPLES = 128, 16, 12


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def calibration():
    return torch.randint(2, VOCAB, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(0))


class Recorder(PruneHook):
    def __init__(self):
        self.calls = []

    def start(self, run):
        self.calls.append("start")

    def finish(self, run):
        self.calls.append("finish")

    def begin_block(self, block):
        self.calls.append(f"begin {block.index}")

    def after_statistics(self, block):
        self.calls.append(f"statistics {block.index}")

    def after_prune(self, block):
        self.calls.append(f"pruned {block.index}: {len(block.reports)} linears")

    def pruned_output(self, block, batch, out):
        self.calls.append(f"output {block.index}")

    def end_block(self, block):
        self.calls.append(f"end {block.index}")


def test_hooks_run_in_order_for_every_block():
    recorder = Recorder()
    prune_model(tiny_llama(), calibration(), PruneOptions("wanda", parse_pattern("unstructured", 0.5)),
                hooks=[recorder])

    def per_block(index, outputs):
        return [f"begin {index}", f"statistics {index}", f"pruned {index}: 7 linears", *[f"output {index}"] * outputs,
                f"end {index}"]

    # the last block's pruned pass runs the error windows only (8 one-window batches): nothing reads its outputs
    assert recorder.calls == ["start", *per_block(0, NSAMPLES), *per_block(1, 8), "finish"]

    magnitude = Recorder()
    prune_model(tiny_llama(), None, PruneOptions("magnitude", parse_pattern("unstructured", 0.5)), hooks=[magnitude])
    assert magnitude.calls == ["start", "begin 0", "pruned 0: 7 linears", "end 0", "begin 1", "pruned 1: 7 linears",
                               "end 1", "finish"]


class Reconstruction(PruneHook):
    """Reads every window's dense outputs and the block's inputs after pruning, and changes the kept weights."""

    dense_windows = NSAMPLES

    def __init__(self, scale):
        self.scale, self.dense_matches, self.outputs = scale, [], {}

    def begin_block(self, block):
        self.dense = copy.deepcopy(block.module)  # the dense block, before anything is pruned

    def after_prune(self, block):
        assert block.dense_batches == NSAMPLES
        expected = block_outputs(self.dense, block.inputs, block.calls, block.batches, block.device)
        self.dense_matches.append(all(torch.allclose(block.outputs[batch], out, atol=1e-6) for batch, out in expected))
        for linear in block.linears.values():
            linear.weight.mul_(self.scale)  # zeros stay zeros

    def pruned_output(self, block, batch, out):
        self.outputs[(block.index, batch.start)] = out.clone()


def test_a_hook_reads_inputs_and_dense_outputs_and_changes_weights_before_the_pruned_pass():
    plain, scaled = Reconstruction(1.0), Reconstruction(1.5)
    models = tiny_llama(), tiny_llama()
    for model, hook in zip(models, (plain, scaled), strict=True):
        prune_model(model, calibration(), PruneOptions("wanda", parse_pattern("unstructured", 0.5)), hooks=[hook])
    assert plain.dense_matches == scaled.dense_matches == [True, True]
    first = "model.layers.0.self_attn.q_proj"
    assert torch.equal(prunable_linears(models[1])[first].weight, 1.5 * prunable_linears(models[0])[first].weight)
    assert all((linear.weight == 0).float().mean() == 0.5 for linear in prunable_linears(models[1]).values())
    # the pruned pass ran with the changed weights
    assert not torch.equal(plain.outputs[(0, 0)], scaled.outputs[(0, 0)])

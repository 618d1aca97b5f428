"""Pruning on the GPU: the CPU's masks (Wanda exactly; SparseGPT within float tolerance), one block on the device
at a time, and a streamed prune that resumes on the GPU where a crashed one stopped.

Tolerances. Wanda's mask is a per-row (or per-group) sort of |W|·‖X‖: the GPU sums ‖X‖² in another order, so a
tie closer than fp32's last bits could flip, and none is that close in these fp32 models: the masks are equal.
SparseGPT's greedy OBS updates change the weights left to prune, so a last-bit difference in the Hessian's
Cholesky factor can move a few later choices: at least 99.9% of mask entries agree, and every block's reconstruction
error ||Y-Ŷ||²/||Y||² agrees within 1e-3 relative.
"""

import copy

import pytest
import torch
from cuda_helpers import CALIB, CUDA, mask_agreement
from tiny_models import random_model, save_random_model

from pruners.masks import parse_pattern
from pruners.sequential import CHUNK_TOKENS, PruneOptions, find_decoder_blocks, prunable_linears, prune_model

pytestmark = CUDA
MASK_AGREEMENT = 0.999  # SparseGPT, GPU against CPU
ERROR_RELATIVE = 1e-3


def prune_on(model, device: str, method: str, pattern: str, ids: torch.Tensor):
    model = copy.deepcopy(model)
    reports = []
    nm = pattern != "unstructured"
    options = PruneOptions(method, parse_pattern(pattern, None if nm else 0.5), device=device)
    prune_model(model, ids, options, on_block=reports.append)
    return model, reports


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_gpu_prune_gives_the_cpu_masks(method, pattern):
    model = random_model("llama", initializer_range=0.2, num_hidden_layers=3)
    ids = torch.randint(4, 320, (8, 64), generator=torch.Generator().manual_seed(0))
    on_cpu, cpu_blocks = prune_on(model, "cpu", method, pattern, ids)
    on_gpu, gpu_blocks = prune_on(model, "cuda", method, pattern, ids)
    assert next(on_gpu.parameters()).device.type == "cpu"  # the model stays in CPU memory
    cpu_linears, gpu_linears = prunable_linears(on_cpu), prunable_linears(on_gpu)
    for name, linear in cpu_linears.items():
        agreement = mask_agreement(gpu_linears[name].weight, linear.weight)
        if method == "wanda":
            assert agreement == 1.0, name
        else:
            assert agreement >= MASK_AGREEMENT, (name, agreement)
    for cpu_block, gpu_block in zip(cpu_blocks, gpu_blocks, strict=True):
        assert gpu_block.reconstruction_error == pytest.approx(cpu_block.reconstruction_error, rel=ERROR_RELATIVE)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_one_block_on_the_device_at_a_time(method):
    """Peak device memory <= one block + both activation buffers + one chunked forward's transients + the block's
    Hessians (SparseGPT also factors one: counted three times) + 64 MiB of kernels' workspace: well under the
    model's blocks together, which stay in CPU memory."""
    hidden, intermediate, heads, depth, nsamples, seqlen = 1024, 2816, 16, 16, 4, 128
    model = random_model("llama", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=depth,
                         num_attention_heads=heads, num_key_value_heads=heads)
    ids = torch.randint(4, 320, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    _, blocks = find_decoder_blocks(model)
    block_bytes = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    activations = 2 * nsamples * seqlen * hidden * 4  # the driver's input and output buffers, fp32
    windows = min(nsamples, CHUNK_TOKENS // seqlen)  # windows per forward
    forward = windows * seqlen * (3 * intermediate + 6 * hidden) * 4 + 2 * windows * heads * seqlen**2 * 4
    hessians = 4 * (3 * hidden**2 + intermediate**2)  # q/k/v share one, o, gate/up share one, down
    bound = block_bytes + activations + forward + 3 * hessians + 64 * 2**20
    assert bound < depth * block_bytes / 2  # the bound means something: under half of the blocks together
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    prune_model(model, ids, PruneOptions(method, parse_pattern("unstructured", 0.5), device="cuda"))
    peak = torch.cuda.max_memory_allocated()
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
    assert torch.cuda.memory_allocated() < block_bytes  # every block went back to CPU memory


class Crash(Exception):
    pass


def test_streamed_prune_resumes_on_the_gpu_bit_identically_and_gives_the_cpu_wanda_masks(tmp_path):
    from spp_cli.stages.prune import prune

    model = str(save_random_model(tmp_path / "llama", num_hidden_layers=4, shard="60KB", initializer_range=0.2))
    options = dict(method="wanda", sparsity=0.5, streaming="on", **CALIB)
    whole = prune(model, tmp_path / "whole", device="cuda", **options)

    def crash_after_block_1(event):
        if event.kind == "block" and event.payload.index == 1:
            raise Crash

    with pytest.raises(Crash):
        prune(model, tmp_path / "resumed", device="cuda", on_event=crash_after_block_1, **options)
    seen = []
    resumed = prune(model, tmp_path / "resumed", device="cuda",
                    on_event=lambda e: e.kind == "block" and seen.append(e.payload.index), **options)
    assert resumed["resumed_from_block"] == 2 and seen == [2, 3]
    assert resumed["manifest_sha256"] == whole["manifest_sha256"]
    on_cpu = prune(model, tmp_path / "cpu", device="cpu", **options)
    assert {n: layer["zeros_sha256"] for n, layer in whole["layers"].items()} == {
        n: layer["zeros_sha256"] for n, layer in on_cpu["layers"].items()}

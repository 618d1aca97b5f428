"""The spp half of one matched run of `python -m benchmarks.prune --peer llmcompressor` (a child process).

The driver (benchmarks/prune_peer.py) hands this worker a model directory and the calibration windows as token ids,
exactly as it hands them to the peer (benchmarks/peer_llmcompressor.py); the worker prunes with spp, saves the
decoder linears, and reports its timestamps and peak RSS. With --worker-forward-baseline it then times plain forward
passes of the same windows (time_plain_forwards): the floor the pruning time is compared with.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from benchmarks import common


def run_matched_worker(args, started: float) -> None:
    """Prune a model directory with spp exactly as the peer script does with llm-compressor; write a JSON result.
    started: time.time() when this process started (benchmarks.prune.STARTED)."""
    import torch

    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file, save_file

    from pruners import parse_pattern
    from pruners.sequential import PruneOptions, prunable_linears, prune_model
    from spp_cli.io.checkpoint import load_model

    imported = time.time()
    # what `spp prune` does (from_pretrained, dtype auto, safetensors only) but without the tokenizer: like the
    # peer, this worker is handed the windows as token ids (Gemma 3's tokenizer alone takes 5-8 s to build)
    model, _ = load_model(args.worker_model, with_tokenizer=False)
    calibration = load_file(args.worker_calibration)["input_ids"]  # (nsamples, seqlen)
    pattern = parse_pattern(args.pattern, args.sparsity)
    loaded = time.time()
    blocks = []
    options = PruneOptions(args.worker_method, pattern, sparsity_profile=args.sparsity_profile,
                           owl_threshold=args.owl_threshold, owl_lambda=args.owl_lambda)
    reports = prune_model(model, calibration, options, on_block=blocks.append)
    pruned = time.time()
    linears = prunable_linears(model)
    weights = {f"{name}.weight": linear.weight.detach().contiguous() for name, linear in linears.items()}
    save_file(weights, args.worker_weights_out)
    done = time.time()
    result = {
        "tool": "spp", "method": args.worker_method, "pattern": str(pattern),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "started": started,
        "imports_seconds": round(imported - started, 3), "load_seconds": round(loaded - imported, 3),
        "prune_seconds": round(pruned - loaded, 3), "save_seconds": round(done - pruned, 3), "done": done,
        "solve_seconds": round(sum(report.seconds for report in reports), 3),  # mask choice + update, no forwards
        "peak_rss_mb": round(common.peak_rss_mb(), 1),
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if args.sparsity_profile == "owl":
        result["owl_block_sparsity"] = [{"block": b.index, "sparsity": b.sparsity, "outlier_ratio": b.outlier_ratio}
                                        for b in blocks]
    if args.worker_forward_baseline:  # after `done` and the RSS reading, so neither includes it
        result.update(time_plain_forwards(model, calibration))
    Path(args.worker_result).write_text(json.dumps(result))


def time_plain_forwards(model, calibration_ids) -> dict:
    """Seconds of plain forward passes of every calibration window through every decoder block.

    The blocks' inputs are captured once (pruners.blocks.capture_block_inputs, timed separately) and replayed with
    pruners.blocks.block_outputs:
      forward_two_passes_seconds  two whole passes per block, batch 1 (the references' loop)
      forward_floor_seconds       per block, a pass that stops at the input of the block's last linear (what the
                                  statistics need) and a whole pass (what the next block needs), in spp's
                                  forward chunks: the forward work no pruner keeping these masks can skip (spp
                                  itself does a little less only in the last block, which feeds no block)
    """
    import torch

    from pruners.blocks import StopForward, block_outputs, capture_block_inputs, find_decoder_blocks
    from pruners.sequential import _chunk_windows, prunable_linears

    _, blocks = find_decoder_blocks(model)
    batches = [slice(i, i + 1) for i in range(calibration_ids.shape[0])]
    chunk = _chunk_windows(prunable_linears(model), batches, calibration_ids.shape[1])  # prune_model's own rule
    cpu = torch.device("cpu")

    def stop(module, args):
        raise StopForward

    def passes(inputs, stop_first_at_last_linear: bool, chunk_windows: int) -> float:
        inputs, outputs = inputs.clone(), torch.empty_like(inputs)
        seconds = 0.0
        for index, block in enumerate(blocks):
            calls = captured.calls[index]
            hook = None
            if stop_first_at_last_linear:  # found before the clock starts
                hook = _last_linear(block, inputs, calls, batches, cpu).register_forward_pre_hook(stop)
            start = time.perf_counter()
            for _ in block_outputs(block, inputs, calls, batches, cpu, chunk_windows=chunk_windows):
                pass  # the statistics pass (with the hook, it yields nothing)
            if hook is not None:
                hook.remove()
            for batch, out in block_outputs(block, inputs, calls, batches, cpu, chunk_windows=chunk_windows):
                outputs[batch].copy_(out)  # the pass whose outputs feed the next block
            seconds += time.perf_counter() - start
            inputs, outputs = outputs, inputs
        return seconds

    with torch.no_grad():
        start = time.perf_counter()
        captured = capture_block_inputs(model, blocks, calibration_ids, batches, cpu, lambda shape, dtype: cpu)
        capture_seconds = time.perf_counter() - start
        two_passes = passes(captured.hidden, False, 1)
        floor = passes(captured.hidden, True, chunk)
    return {"forward_two_passes_seconds": round(two_passes, 3), "forward_capture_seconds": round(capture_seconds, 3),
            "forward_floor_seconds": round(floor, 3), "forward_floor_chunk_windows": chunk}


def _last_linear(block, inputs, calls, batches, device):
    """The nn.Linear a forward of `block` runs last, from one window's forward."""
    import torch.nn as nn

    from pruners.blocks import block_outputs

    order = []
    handles = [module.register_forward_pre_hook(lambda module, args: order.append(module))
               for module in block.modules() if isinstance(module, nn.Linear)]
    try:
        for _ in block_outputs(block, inputs, calls[:1], batches[:1], device):
            pass
    finally:
        for handle in handles:
            handle.remove()
    return order[-1]

"""`python -m benchmarks.prune --memory`: peak RSS of the prune stage against depth, streamed and in memory (JSON).

Random-init LLaMA shapes (hidden 1024, intermediate 2816, 16 heads, vocab 32000, fp32, seed 0) with 4, 16 and 32
blocks are saved to disk first (safetensors, with the shipped tiny model's tokenizer for the calibration windows).
Each (depth, mode) then runs the prune stage, spp_cli.stages.prune.prune(..., streaming="on" | "off"), in a fresh
subprocess, which reports:
  peak_rss_mb       its peak resident memory (VmHWM, read in the child after the output is published)
  process_seconds   wall time of the subprocess (imports, load, calibration, pruning, writing the output)
  block_seconds     each block's wall time (BlockReport.seconds): forward passes, statistics and pruning, and
                    with streaming also writing the block, hashing it for spp.json and saving the next inputs
                    (work the in-memory path does after the last block instead: compare process_seconds too;
                    streaming keeps block i on a writer thread while block i + 1 runs, so a block's seconds
                    include only what of the previous block's keeping is left when it ends, and the last
                    block's keeping falls outside every block, like the in-memory path's save)
  prune_call_seconds  the prune() call alone, end to end (load, calibration, blocks, writing the output):
                    the same work on both paths, the fairest whole-stage comparison
  load_before       the 1, 5 and 15 minute load averages just before the run (the machine may not be quiet)
The summary gives, per mode, how much the peak grows from the shallowest to the deepest model (the issue's
target: < 15% with streaming) and the mean seconds per block side by side (medians over --memory-repeats rounds of
on, off; the issue's target: streaming's within 10% of the in-memory path's).

  OMP_NUM_THREADS=1 python -m benchmarks.prune --memory --methods wanda --nsamples 8 --seqlen 128

`python -m benchmarks.prune_memory ARGS` is the same as `python -m benchmarks.prune --memory ARGS`. --smoke: one
2-block hidden-64 model, 4 x 32 windows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks import common

DEPTHS = (4, 16, 32)
MODES = ("on", "off")

_CHILD = """
import json, sys, time
started = time.perf_counter()
from benchmarks.common import peak_rss_mb
from spp_cli.stages.prune import prune
blocks = []
options = json.loads(sys.argv[1])
called = time.perf_counter()
prune(on_event=lambda event: blocks.append(event.payload) if event.kind == "block" else None, **options)
ended = time.perf_counter()
print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "child_seconds": round(ended - started, 3),
                  "prune_call_seconds": round(ended - called, 3),
                  "block_seconds": [round(block.seconds, 3) for block in blocks]}))
"""


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory", action="store_true",
                        help="peak RSS of the prune stage against depth, streaming and in memory")
    parser.add_argument("--depths", default=None, help="--memory: block counts (default 4,16,32)")
    parser.add_argument("--scratch", default=None, help="--memory: where the models are saved (default: $TMPDIR)")
    parser.add_argument("--memory-repeats", type=int, default=1,
                        help="--memory: streaming on, off, on, off, ... this many times per depth (default 1)")


def run_one(model_dir: Path, out: Path, mode: str, method: str, args) -> dict:
    options = {"model": str(model_dir), "out": str(out), "method": method, "sparsity": args.sparsity or 0.5,
               "pattern": args.pattern, "calib": args.calib or "builtin:python-docs:train",
               "nsamples": args.nsamples, "seqlen": args.seqlen, "device": args.device, "streaming": mode}
    load = [round(x, 2) for x in os.getloadavg()]
    seconds, result, failure = common.run_child(_CHILD, options, out)
    if result is None:
        return {"streaming": mode, "failed": failure}
    blocks = result["block_seconds"]
    return {"streaming": mode, "load_before": load, "process_seconds": round(seconds, 3), **result,
            "mean_block_seconds": round(statistics.fmean(blocks), 4) if blocks else None}


def summarize(runs: list[dict], depths: list[int]) -> dict:
    """Per mode and depth, the median over repeats of each run's peak, mean block seconds and process seconds;
    the peak's growth from the shallowest to the deepest model; streaming's block seconds over in-memory's."""
    summary = {}
    for mode in MODES:
        by_depth = {depth: [run for run in runs if run["streaming"] == mode and run["blocks"] == depth
                            and "failed" not in run] for depth in depths}
        by_depth = {depth: found for depth, found in by_depth.items() if found}
        median = {key: {str(depth): round(statistics.median(run[key] for run in found), 4)
                        for depth, found in by_depth.items()}
                  for key in ("peak_rss_mb", "mean_block_seconds", "process_seconds", "prune_call_seconds")}
        if depths[0] in by_depth and depths[-1] in by_depth:
            low, high = median["peak_rss_mb"][str(depths[0])], median["peak_rss_mb"][str(depths[-1])]
            summary[mode] = {"repeats": min(len(found) for found in by_depth.values()), **median,
                             f"peak_growth_{depths[0]}_to_{depths[-1]}_blocks": round(high / low - 1, 4)}
    if all(mode in summary for mode in MODES):
        on, off = summary["on"]["mean_block_seconds"], summary["off"]["mean_block_seconds"]
        summary["streaming_over_in_memory_block_seconds"] = {depth: round(on[depth] / off[depth], 3)
                                                             for depth in on if depth in off}
        on, off = summary["on"]["prune_call_seconds"], summary["off"]["prune_call_seconds"]
        summary["streaming_over_in_memory_prune_call_seconds"] = {depth: round(on[depth] / off[depth], 3)
                                                                  for depth in on if depth in off}
    return summary


def run_memory_benchmark(args, methods: list[str]) -> dict:
    import torch  # noqa: F401  (machine_info reports its version)
    import transformers  # noqa: F401

    depths = sorted(int(depth) for depth in (args.depths or ",".join(map(str, DEPTHS))).split(","))
    shape = "h64" if args.smoke else "h1024"
    runs = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        for depth in depths:  # fp32, seed 0, the tiny model's tokenizer for the calibration windows
            model_dir = common.save_random_llama(Path(scratch) / f"llama-{shape}-b{depth}", shape,
                                                 num_hidden_layers=depth)
            for method in methods:
                for repeat in range(args.memory_repeats):
                    for mode in MODES:
                        run = {"blocks": depth, "method": method, "repeat": repeat,
                               **run_one(model_dir, Path(scratch) / "out", mode, method, args)}
                        runs.append(run)
                        print(json.dumps(run), flush=True)
            shutil.rmtree(model_dir)
    config = common.LLAMA_SHAPES[shape]
    return {
        "benchmark": "spp prune stage peak RSS against depth (benchmarks/prune_memory.py)",
        "config": {"model": f"random-init LLaMA, hidden {config['hidden_size']}, intermediate "
                            f"{config['intermediate_size']}, vocab {config['vocab_size']}, fp32 on disk",
                   "depths": depths, "methods": methods, "pattern": args.pattern, "sparsity": args.sparsity or 0.5,
                   "nsamples": args.nsamples, "seqlen": args.seqlen, "device": args.device,
                   "repeats": args.memory_repeats, "smoke": args.smoke},
        "machine": common.machine_info(),
        "summary": {method: summarize([run for run in runs if run["method"] == method], depths)
                    for method in methods},
        "runs": runs,
        "created": common.timestamp(),
    }


def main(argv: list[str] | None = None) -> None:
    from benchmarks import prune

    prune.main(["--memory", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

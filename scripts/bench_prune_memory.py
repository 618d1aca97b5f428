"""`bench_prune.py --memory`: peak RSS of the prune stage against model depth, streaming and in memory, as JSON.

Random-init LLaMA shapes (hidden 1024, intermediate 2816, 16 heads, vocab 32000, fp32, seed 0) with 4, 16 and 32
blocks are saved to disk first (safetensors, with the shipped tiny model's tokenizer for the calibration windows).
Each (depth, mode) then runs the prune stage, spp_cli.stages.prune.prune(..., streaming="on" | "off"), in a fresh
subprocess, which reports:
  peak_rss_mb       its peak resident memory (VmHWM, read in the child after the output is published)
  process_seconds   wall time of the subprocess (imports, load, calibration, pruning, writing the output)
  block_seconds     each block's wall time (BlockReport.seconds): forward passes, statistics and pruning, and
                    with streaming also writing the block, hashing it for spp.json and saving the next inputs
                    (work the in-memory path does after the last block instead: compare process_seconds too)
The summary gives, per mode, how much the peak grows from the shallowest to the deepest model (the issue's
target: < 15% with streaming) and the mean seconds per block side by side (medians over --memory-repeats rounds of
on, off; the issue's target: streaming's within 10% of the in-memory path's).

  OMP_NUM_THREADS=1 python scripts/bench_prune.py --memory --methods wanda --nsamples 8 --seqlen 128
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FROM = REPO / "spp_cli" / "assets" / "tiny-llama"
DEPTHS = (4, 16, 32)
MODES = ("on", "off")

_CHILD = """
import json, sys, time
started = time.perf_counter()
from spp_cli.stages.prune import prune
blocks = []
options = json.loads(sys.argv[1])
prune(on_event=lambda event: blocks.append(event.payload), **options)
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": round(peak, 1), "child_seconds": round(time.perf_counter() - started, 3),
                  "block_seconds": [round(block.seconds, 3) for block in blocks]}))
"""


def save_random_llama(directory: Path, depth: int) -> Path:
    """The random-init hidden-1024 LLaMA with `depth` blocks, saved as save_pretrained does (fp32, seed 0)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=depth, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=2048,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(TOKENIZER_FROM / name, directory / name)
    return directory


def run_one(model_dir: Path, out: Path, mode: str, method: str, args) -> dict:
    options = {"model": str(model_dir), "out": str(out), "method": method, "sparsity": args.sparsity or 0.5,
               "pattern": args.pattern, "calib": args.calib or "builtin:python-docs:train",
               "nsamples": args.nsamples, "seqlen": args.seqlen, "device": args.device, "streaming": mode}
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(options)], cwd=REPO, capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    if completed.returncode != 0:
        return {"streaming": mode, "failed": completed.stderr.strip().splitlines()[-1:]}
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    blocks = result["block_seconds"]
    return {"streaming": mode, "process_seconds": round(seconds, 3), **result,
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
                  for key in ("peak_rss_mb", "mean_block_seconds", "process_seconds")}
        if depths[0] in by_depth and depths[-1] in by_depth:
            low, high = median["peak_rss_mb"][str(depths[0])], median["peak_rss_mb"][str(depths[-1])]
            summary[mode] = {"repeats": min(len(found) for found in by_depth.values()), **median,
                             f"peak_growth_{depths[0]}_to_{depths[-1]}_blocks": round(high / low - 1, 4)}
    if all(mode in summary for mode in MODES):
        on, off = summary["on"]["mean_block_seconds"], summary["off"]["mean_block_seconds"]
        summary["streaming_over_in_memory_block_seconds"] = {depth: round(on[depth] / off[depth], 3)
                                                             for depth in on if depth in off}
    return summary


def run_memory_benchmark(args, methods: list[str]) -> dict:
    import torch
    import transformers

    depths = sorted(int(depth) for depth in (args.depths or ",".join(map(str, DEPTHS))).split(","))
    runs = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        for depth in depths:
            model_dir = save_random_llama(Path(scratch) / f"llama-h1024-b{depth}", depth)
            for method in methods:
                for repeat in range(args.memory_repeats):
                    for mode in MODES:
                        run = {"blocks": depth, "method": method, "repeat": repeat,
                               **run_one(model_dir, Path(scratch) / "out", mode, method, args)}
                        runs.append(run)
                        print(json.dumps(run), flush=True)
            shutil.rmtree(model_dir)
    return {
        "benchmark": "spp prune stage peak RSS against depth (scripts/bench_prune_memory.py)",
        "config": {"model": "random-init LLaMA, hidden 1024, intermediate 2816, vocab 32000, fp32 on disk",
                   "depths": depths, "methods": methods, "pattern": args.pattern, "sparsity": args.sparsity or 0.5,
                   "nsamples": args.nsamples, "seqlen": args.seqlen, "device": args.device,
                   "repeats": args.memory_repeats},
        "machine": {"cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "platform": platform.platform(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "loadavg_at_end": list(os.getloadavg())},
        "summary": {method: summarize([run for run in runs if run["method"] == method], depths)
                    for method in methods},
        "runs": runs,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

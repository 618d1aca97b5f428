"""`python -m benchmarks.merge_memory`: peak RSS of `spp merge` against depth, streaming and in memory (JSON).

Random-init LLaMA shapes (hidden 1024, intermediate 2816, 16 heads, vocab 32000, fp32, seed 0) with 4, 16 and 32
blocks stand in for pruned checkpoints: every decoder linear's 50% smallest weights are zeroed and the folder gets
the spp.json a prune writes (its layers' records), with a random SPP adapter beside it in `spp finetune --no-merge`'s
layout. Each (depth, mode) then runs the merge stage, spp_cli.stages.merge.merge_adapter(..., streaming="on" |
"off"), in a fresh subprocess, which reports:
  peak_rss_mb           its peak resident memory (VmHWM, read in the child after the output is published)
  rss_after_imports_mb  its resident memory once torch, transformers and spp are imported (the floor)
  process_seconds       wall time of the subprocess
The summary gives, per mode, the peak at each depth and how much it grows from the shallowest to the deepest model
(the issue's target for streaming: < 15% from 4 to 32 blocks; the in-memory path's growth beside it).

  OMP_NUM_THREADS=1 python -m benchmarks.merge_memory [--depths 4,16,32] [--out FILE]

--smoke: one 2-block hidden-64 model, both modes (the test suite's check that the benchmark runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from benchmarks import common

DEPTHS = (4, 16, 32)
MODES = ("on", "off")

_CHILD = """
import json, sys, time
started = time.perf_counter()
from benchmarks.common import peak_rss_mb, process_status_mb
from spp_cli.stages.merge import merge_adapter
import torch, transformers  # noqa: F401  (merge_adapter imports them on first use: count them in the floor)
floor = process_status_mb()
merge_adapter(**json.loads(sys.argv[1]))
print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_imports_mb": round(floor, 1),
                  "child_seconds": round(time.perf_counter() - started, 3)}))
"""


def save_pruned_with_adapter(directory: Path, shape: str, depth: int) -> Path:
    """A random LLaMA of `shape` with `depth` blocks, its decoder linears 50% zero (magnitude), saved with a prune's
    spp.json into directory/pruned; a random SPP adapter on it saved into directory/adapter (returned)."""
    import torch

    from pruners.sequential import prunable_linears
    from spp_cli.adapters.spp import SPPAdapter
    from spp_cli.io import checkpoint
    from spp_cli.io.manifest import layers_record, stage_manifest

    model = common.random_llama(shape, num_hidden_layers=depth)
    linears = prunable_linears(model)
    with torch.no_grad():
        for linear in linears.values():
            weight = linear.weight
            weight[weight.abs() <= weight.abs().flatten().kthvalue(weight.numel() // 2).values] = 0
    pruned = directory / "pruned"
    model.save_pretrained(pruned)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(common.TINY_DIR / name, pruned / name)
    manifest = stage_manifest("prune", parent={"path": "random", "revision": None, "manifest_sha256": None},
                              method="magnitude", pattern="unstructured", target_sparsity=0.5, dense=False,
                              layers=layers_record(model, list(linears)), config={}, fingerprint="benchmark")
    manifest = checkpoint.finish_manifest(manifest, 0.0)
    checkpoint.write_manifest(pruned, manifest)
    adapter = SPPAdapter.from_options(SimpleNamespace())
    adapted = adapter.inject(model, list(linears))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in (p for p in adapted.parameters() if p.requires_grad):
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    adapter.save(adapted, directory / "adapter", base_path=str(pruned.resolve()),
                 base_manifest_sha256=manifest["manifest_sha256"])
    return directory / "adapter"


def run_one(adapter_dir: Path, out: Path, mode: str) -> dict:
    options = {"adapter_dir": str(adapter_dir), "out": str(out), "streaming": mode}
    seconds, result, failure = common.run_child(_CHILD, options, out)
    if result is None:
        return {"streaming": mode, "failed": failure}
    return {"streaming": mode, "process_seconds": round(seconds, 3), **result}


def summarize(runs: list[dict], depths: list[int]) -> dict:
    """Per mode, the peak RSS at each depth and its growth from the shallowest to the deepest model."""
    summary = {}
    for mode in MODES:
        peaks = {run["blocks"]: run["peak_rss_mb"] for run in runs if run["streaming"] == mode and "failed" not in run}
        if depths[0] in peaks and depths[-1] in peaks:
            summary[mode] = {"peak_rss_mb": {str(depth): peaks[depth] for depth in depths if depth in peaks},
                             f"peak_growth_{depths[0]}_to_{depths[-1]}_blocks":
                                 round(peaks[depths[-1]] / peaks[depths[0]] - 1, 4)}
    return summary


def run_benchmark(args) -> dict:
    import torch  # noqa: F401  (machine_info reports its version)
    import transformers  # noqa: F401

    depths = [2] if args.smoke else sorted(int(depth) for depth in args.depths.split(","))
    shape = "h64" if args.smoke else "h1024"
    runs = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        for depth in depths:
            adapter_dir = save_pruned_with_adapter(Path(scratch) / f"llama-{shape}-b{depth}", shape, depth)
            for mode in MODES:
                run = {"blocks": depth, **run_one(adapter_dir, Path(scratch) / "out", mode)}
                runs.append(run)
                print(json.dumps(run), flush=True)
            shutil.rmtree(adapter_dir.parent)
    config = common.LLAMA_SHAPES[shape]
    return {
        "benchmark": "spp merge peak RSS against depth, streaming and in memory (benchmarks/merge_memory.py)",
        "command": "python -m benchmarks.merge_memory " + " ".join(args.argv),
        "config": {"model": f"random-init LLaMA, hidden {config['hidden_size']}, intermediate "
                            f"{config['intermediate_size']}, vocab {config['vocab_size']}, fp32 on disk, decoder "
                            "linears 50% zero (magnitude), a random SPP adapter (groups 16)",
                   "depths": depths, "smoke": args.smoke},
        "machine": common.machine_info(loadavg_at_start=args.loadavg_at_start),
        "summary": summarize(runs, depths),
        "runs": runs,
        "created": common.timestamp(),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.merge_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default=",".join(map(str, DEPTHS)), help="block counts (default 4,16,32)")
    parser.add_argument("--scratch", default=None, help="where the models are saved (default: $TMPDIR)")
    parser.add_argument("--smoke", action="store_true", help="one 2-block hidden-64 model")
    parser.add_argument("--out", default=None, help="the JSON report (default benchmarks/results/merge_memory.json)")
    args = parser.parse_args(argv)
    args.argv, args.loadavg_at_start = argv, [round(x, 2) for x in os.getloadavg()]
    report = run_benchmark(args)
    common.write_json(report, args.out or common.default_out("merge_memory", args.smoke))


if __name__ == "__main__":
    main()

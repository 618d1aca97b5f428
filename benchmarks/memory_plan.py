"""`python -m benchmarks.memory_plan`: the memory plan's estimates against measured peak RSS, and its table of the
7B/13B/70B LLaMA shapes (JSON).

Measured: random-init LLaMAs (fp32 on disk, tokenizer of the tiny model) saved to a scratch folder; one fresh
subprocess per model runs every stage in turn on the CPU, in the stage functions the commands call:
  prune     spp_cli.stages.prune.prune (wanda 50%, builtin:python-docs windows), streaming off, then on
  finetune  spp_cli.stages.finetune.finetune (spp, 1 step, micro batch 1, --no-merge)
  merge     spp_cli.stages.merge.merge_adapter of that adapter, streaming off, then on
  eval      spp_cli.stages.evaluate.evaluate_models (token perplexity, 2 windows)
Before each stage the child frees what it can (gc, malloc_trim), reads its RSS and resets its peak
(/proc/self/clear_refs); after it, "measured" = VmHWM - that RSS. Large allocations are returned to the system at
once (MALLOC_MMAP_THRESHOLD_), so a stage does not reuse the previous one's freed pages unseen. "estimated" is the
plan's CPU figure (spp_cli/memory_plan) above the runtime floor; "ratio" = estimated / measured.

  OMP_NUM_THREADS=1 python -m benchmarks.memory_plan [--sizes 512x4,1024x8] [--out FILE]
  python -m benchmarks.memory_plan --shapes          # the README's table: per stage, 7B/13B/70B, no measurement

--smoke: one small model (the test suite's check that the benchmark runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

SIZES = ("512x4", "1024x8")  # hidden x blocks: weights of ~0.1 and ~0.6 GB in fp32
STAGES = ("prune", "prune-streaming", "finetune", "merge", "merge-streaming", "eval")

_CHILD = r"""
import ctypes, gc, json, sys
from pathlib import Path
spec = json.loads(sys.argv[1])
import torch, transformers, peft  # noqa: F401  the floor: every library a stage imports
import spp_cli.eval.engine, spp_cli.training.trainer  # noqa: F401
from benchmarks.common import process_status_mb, reset_peak_rss
from spp_cli.stages.evaluate import evaluate_models
from spp_cli.stages.finetune import finetune
from spp_cli.stages.merge import merge_adapter
from spp_cli.stages.prune import prune
from spp_cli.memory_plan import stage_plans_for_benchmark
libc = ctypes.CDLL("libc.so.6")
def calls(model, work):
  return {
    "prune": lambda: prune(model, work / "prune", method="wanda", calib="builtin:python-docs:train",
                           nsamples=spec["nsamples"], seqlen=spec["seqlen"], streaming="off", overwrite=True),
    "prune-streaming": lambda: prune(model, work / "prune-s", method="wanda", calib="builtin:python-docs:train",
                           nsamples=spec["nsamples"], seqlen=spec["seqlen"], streaming="on"),
    "finetune": lambda: finetune(str(work / "prune"), work / "finetune", data="builtin:python-docs:train",
                           max_steps=1, batch_size=1, micro_batch_size=1, seqlen=spec["seqlen"], val_size=0,
                           no_merge=True),
    "merge": lambda: merge_adapter(work / "finetune" / "adapter", work / "merge", streaming="off"),
    "merge-streaming": lambda: merge_adapter(work / "finetune" / "adapter", work / "merge-s", streaming="on"),
    "eval": lambda: evaluate_models({"m": str(work / "prune")}, ["ppl:builtin:python-docs:test"], work / "r.json",
                           seqlen=spec["seqlen"], limit=2),
  }
results = []
for model, work in zip(spec["models"], spec["works"]):
    measured, stage_calls = {}, calls(model, Path(work))
    for name in spec["stages"]:
        gc.collect(); libc.malloc_trim(0)
        floor = process_status_mb()
        reset_peak_rss()
        stage_calls[name]()
        measured[name] = process_status_mb("VmHWM") - floor
    results.append({"measured_mb": measured, "estimated_mb": stage_plans_for_benchmark(model, work, spec)})
print(json.dumps(results))
"""


def measure(model_dirs: list[Path], works: list[Path], stages=STAGES, nsamples: int = 8, seqlen: int = 64
            ) -> list[dict]:
    """Run `stages` on each model in one fresh subprocess (one import of the libraries); per model
    {"measured_mb", "estimated_mb", "ratio"}, each per stage."""
    spec = {"models": [str(m) for m in model_dirs], "works": [str(w) for w in works], "stages": list(stages),
            "nsamples": nsamples, "seqlen": seqlen}
    env = {**os.environ, "PYTHONPATH": str(common.REPO), "MALLOC_MMAP_THRESHOLD_": "65536",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], cwd=common.REPO,
                               capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr.strip()[-2000:])
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    for result in results:
        result["ratio"] = {name: round(result["estimated_mb"][name] / result["measured_mb"][name], 3)
                           for name in result["measured_mb"]}
    return results


def save_model(directory: Path, size: str) -> Path:
    hidden, blocks = (int(part) for part in size.split("x"))
    return common.save_random_llama(directory, "h256", hidden_size=hidden,
                                    intermediate_size=hidden * 11 // 4 // 16 * 16,
                                    num_hidden_layers=blocks, num_attention_heads=hidden // 64,
                                    num_key_value_heads=hidden // 64, vocab_size=8192)


def shapes_table(shape_names=("llama-7b", "llama-13b", "llama-70b")) -> list[dict]:
    """Per shape and stage the plan's peaks (GiB) on one GPU, from spp_cli/memory_plan alone (no model built)."""
    from spp_cli.memory_plan import shape_rows

    return [row for name in shape_names for row in shape_rows(name)]


def markdown_table(rows: list[dict]) -> str:
    """The README's table: a row per stage variant, "CPU RAM / GPU / disk" GiB per shape."""
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for row in rows:
        gpu = "-" if row["device_gib"] is None else f"{row['device_gib']:g}"
        cells.setdefault((row["stage"], row["variant"]), {})[row["shape"]] = (
            f"{row['cpu_gib']:g} / {gpu} / {row['disk_gib']:g}")
    shapes = list(dict.fromkeys(row["shape"] for row in rows))
    lines = ["| stage | variant | " + " | ".join(shapes) + " |", "|---|---|" + "---|" * len(shapes)]
    lines += [f"| {stage} | {variant} | " + " | ".join(by_shape[s] for s in shapes) + " |"
              for (stage, variant), by_shape in cells.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_plan", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help="hidden x blocks of each model (default 512x4,1024x8)")
    parser.add_argument("--shapes", action="store_true", help="print the 7B/13B/70B table only (no measurement)")
    parser.add_argument("--smoke", action="store_true", help="one 256x2 model")
    parser.add_argument("--out", default=None, help="the JSON report (default benchmarks/results/memory_plan.json)")
    args = parser.parse_args(argv)
    if args.shapes:
        print(markdown_table(shapes_table()))
        return
    load = [round(x, 2) for x in os.getloadavg()]
    sizes = ["256x2"] if args.smoke else args.sizes.split(",")
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in sizes:  # one child a size: a larger model's seconds are its own
            model_dir = save_model(Path(scratch) / f"llama-{size}", size)
            started = time.perf_counter()
            (result,) = measure([model_dir], [Path(scratch) / f"work-{size}"])
            runs.append({"size": size, **result, "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(runs[-1]), flush=True)
    report = {
        "benchmark": "memory plan estimate against measured peak RSS growth per stage (benchmarks/memory_plan.py)",
        "command": "python -m benchmarks.memory_plan " + " ".join(argv),
        "machine": common.machine_info(loadavg_at_start=load),
        "runs": runs, "shapes": shapes_table(), "created": common.timestamp(),
    }
    common.write_json(report, args.out or common.default_out("memory_plan", args.smoke))


if __name__ == "__main__":
    main()

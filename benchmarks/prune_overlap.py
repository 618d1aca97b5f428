"""`python -m benchmarks.prune_overlap`: seconds per block of the streamed prune against the in-memory one (JSON).

The streamed prune keeps block i (writes it into the output's shards, hashes it for spp.json, saves the next
block's inputs, replaces resume.json) on a writer thread while block i + 1 is computed (spp_cli/stages/
prune_streaming.py). This measures what that costs against the in-memory path, in one process, on one random-init
LLaMA saved to disk (hidden 1024, intermediate 2816, vocab 32000, fp32, seed 0), three variants of the prune stage
(spp_cli.stages.prune.prune) per round, their order rotated each round:
  in-memory         streaming="off": the whole model loaded first, saved after the last block
  streamed          streaming="on": the writer thread overlapping each block's keeping with the next block
  streamed-inline   streaming="on" with the keeping done in the driver's thread, as before the overlap (the
                    writer replaced by one that runs each job at once): the same code, without the overlap
Per run: each block's seconds (BlockReport.seconds: load, forwards, statistics, prune, and the store's block_done;
for `streamed` that is the hand-off plus whatever of the previous block's keeping is still running; the last
block's keeping falls after every block, like the in-memory path's save), their mean, the whole prune() call's
seconds (the same work on every path: load, calibration, blocks, writing the output) and the load average before.
The summary gives the medians over rounds and the ratios to in-memory (the issue's target: streamed <= 1.05x per
block). The machine may not be quiet: the load is in every run, and the variants alternate.

  OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.prune_overlap --blocks 4 --nsamples 16 --seqlen 256 --rounds 3

--smoke: one 2-block hidden-64 model, 4 x 32 windows, one round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

VARIANTS = ("in-memory", "streamed", "streamed-inline")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prune_overlap", description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="each round runs every variant once")
    parser.add_argument("--scratch", default=None, help="where the model and outputs go (default: $TMPDIR)")
    parser.add_argument("--out", default=None, help="default benchmarks/results/prune_overlap.json")
    parser.add_argument("--smoke", action="store_true", help="a few seconds on a 2-block hidden-64 model")
    args = parser.parse_args(argv)
    if args.smoke:
        args.blocks, args.nsamples, args.seqlen, args.rounds = 2, 4, 32, 1
    return args


class _InlineWriter:
    """streamed-inline: what BackgroundWriter does, each job run at once in the caller's thread (no overlap)."""

    def start(self, job) -> None:
        job()

    then = start

    def wait(self) -> None:
        pass

    close = wait


def run_variant(variant: str, model_dir: Path, out: Path, args) -> dict:
    from unittest import mock

    from spp_cli.stages import prune_streaming
    from spp_cli.stages.prune import prune

    blocks = []
    options = {"method": args.method, "sparsity": 0.5, "calib": "builtin:python-docs:train",
               "nsamples": args.nsamples, "seqlen": args.seqlen, "device": "cpu",
               "streaming": "off" if variant == "in-memory" else "on"}
    writer = _InlineWriter if variant == "streamed-inline" else prune_streaming.BackgroundWriter
    load = [round(x, 2) for x in os.getloadavg()]
    with mock.patch.object(prune_streaming, "BackgroundWriter", writer):
        start = time.perf_counter()
        prune(str(model_dir), out, overwrite=True,
              on_event=lambda event: blocks.append(event.payload.seconds) if event.kind == "block" else None,
              **options)
        seconds = time.perf_counter() - start
    return {"variant": variant, "load_before": load, "prune_call_seconds": round(seconds, 3),
            "block_seconds": [round(block, 3) for block in blocks],
            "mean_block_seconds": round(statistics.fmean(blocks), 4)}


def summarize(runs: list[dict]) -> dict:
    median = {variant: {key: round(statistics.median(run[key] for run in runs if run["variant"] == variant), 4)
                        for key in ("mean_block_seconds", "prune_call_seconds")} for variant in VARIANTS}
    ratios = {f"{variant}_over_in_memory": {key: round(median[variant][key] / median["in-memory"][key], 3)
                                            for key in median[variant]} for variant in VARIANTS[1:]}
    return {"median": median, **ratios}


def run_benchmark(args, out: str) -> None:
    """Every round, the report rewritten to `out` after each run (a run cut short keeps what it measured)."""
    import shutil

    import torch  # noqa: F401  (machine_info reports its version)
    import transformers  # noqa: F401

    shape = "h64" if args.smoke else "h1024"
    runs = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        model_dir = common.save_random_llama(Path(scratch) / "model", shape, num_hidden_layers=args.blocks)
        for round_index in range(args.rounds):
            order = VARIANTS[round_index % 3:] + VARIANTS[:round_index % 3]
            for variant in order:
                run = {"round": round_index, **run_variant(variant, model_dir, Path(scratch) / "out", args)}
                shutil.rmtree(Path(scratch) / "out", ignore_errors=True)
                runs.append(run)
                common.write_json(report(args, shape, runs), out, announce=False)
    common.write_json(report(args, shape, runs), out)


def report(args, shape: str, runs: list[dict]) -> dict:
    config = common.LLAMA_SHAPES[shape]
    return {
        "benchmark": "streamed prune against in-memory, seconds per block (benchmarks/prune_overlap.py)",
        "config": {"model": f"random-init LLaMA, hidden {config['hidden_size']}, intermediate "
                            f"{config['intermediate_size']}, vocab {config['vocab_size']}, fp32 on disk",
                   "blocks": args.blocks, "method": args.method, "sparsity": 0.5, "nsamples": args.nsamples,
                   "seqlen": args.seqlen, "device": "cpu", "rounds": args.rounds, "smoke": args.smoke},
        "machine": common.machine_info(),
        "summary": summarize(runs) if {run["variant"] for run in runs} == set(VARIANTS) else None,
        "runs": runs,
        "created": common.timestamp(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_benchmark(args, args.out or common.default_out("prune_overlap", args.smoke))


if __name__ == "__main__":
    main()

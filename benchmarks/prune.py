"""Benchmark one-shot pruning: seconds and peak memory per method, as JSON.

Each (model, method) runs in a fresh subprocess, so the numbers are independent of each other:
  process_seconds   wall time of the whole subprocess (interpreter start, imports, model build/load, pruning)
  prune_seconds     the prune_model(...) call alone (capture, forward passes, statistics, solves)
  solve_seconds     the sum of the per-layer LayerReport.seconds (mask choice and weight update only: the papers'
                    "time spent on pruning, without the forward passes")
  peak_rss_mb       the subprocess's peak resident memory (VmHWM); rss_before_prune_mb is its RSS with the
                    model loaded, just before pruning, so the difference is what pruning itself adds

Models: a random-init LLaMA (hidden 1024, intermediate 2816, 8 blocks, 16 heads, vocab 32000) always; the shipped
tiny model (builtin:tiny-llama) when spp_cli can load it; and --model PATH when given. Calibration: 64 x 256
random token ids by default (timing does not depend on the text); with --calib SOURCE and a model that has a
tokenizer, windows come from spp_cli.data.sources.calibration_windows.

  OMP_NUM_THREADS=2 python -m benchmarks.prune --out benchmarks/results/prune.json

--peer llmcompressor runs the same pruning through spp and through llm-compressor, alternating child processes
(benchmarks/prune_peer.py says what each number includes; the peer runs benchmarks/peer_llmcompressor.py in its
own venv):

  .venv/bin/python -m benchmarks.prune --peer llmcompressor --threads 2 --out benchmarks/results/prune_peer.json

--memory runs the prune stage (streaming on, then off) on random-init hidden-1024 LLaMAs of 4, 16 and 32 blocks
saved to disk, one subprocess each, and reports their peak RSS against depth (benchmarks/prune_memory.py):

  OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.prune --memory --methods wanda --nsamples 8 --seqlen 128

--smoke: the same code in a few seconds (the tiny model only, 4 x 32 windows, Wanda unless --methods; with --peer
the peer only when its venv exists already; with --memory one 2-block hidden-64 model).
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

STARTED = time.time()  # a worker's process start (this module imports only the standard library)
RANDOM_LLAMA = "random-llama-h1024-b8"
METHODS = ("magnitude", "wanda", "sparsegpt")
PEER_METHODS = ("wanda", "sparsegpt")  # what llm-compressor has (its magnitude modifier is a schedule, not one-shot)
SMOKE = {"nsamples": 4, "seqlen": 32, "repeats": 1, "repeats_random": 1, "peer_models": "tiny-llama",
         "depths": "2", "memory_repeats": 1}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="With --peer llmcompressor the own-benchmark options --model/--device/--methods magnitude do not apply; "
               "see the module docstrings for what each number includes.",
    )
    parser.add_argument("--model", help="an extra model to benchmark: a local HF directory or builtin:NAME")
    parser.add_argument("--methods", default=None,
                        help="comma-separated (default: all three; with --peer: wanda,sparsegpt)")
    parser.add_argument("--pattern", default="unstructured", help="unstructured or N:M (default unstructured)")
    parser.add_argument("--sparsity", type=float, default=None, help="default 0.5 (N/M for N:M)")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--calib", default=None, help="calibration SOURCE for models with a tokenizer (default: "
                        "random token ids; with --peer: the shared C4 slice when present, else builtin:python-docs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-random", action="store_true", help="skip the random-init hidden-1024 LLaMA")
    parser.add_argument("--skip-tiny", action="store_true", help="skip builtin:tiny-llama")
    parser.add_argument("--out", default=None, help="default benchmarks/results/prune.json (prune_peer.json with "
                        "--peer, prune_memory.json with --memory; under results/smoke/ with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds on the tiny model (see above)")
    from benchmarks import prune_memory, prune_peer

    prune_peer.add_options(parser)
    prune_memory.add_options(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-model", help=argparse.SUPPRESS)
    parser.add_argument("--worker-method", help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", help=argparse.SUPPRESS)
    parser.add_argument("--worker-calibration", help=argparse.SUPPRESS)  # --peer: the shared windows
    parser.add_argument("--worker-weights-out", help=argparse.SUPPRESS)  # --peer: where the pruned linears go
    parser.add_argument("--worker-forward-baseline", action="store_true", help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# worker: one (model, method) in this process


def _load(spec: str):
    """(model, tokenizer or None) for RANDOM_LLAMA, builtin:NAME or a local directory."""
    if spec == RANDOM_LLAMA:
        return common.random_llama("h1024", attn_implementation="sdpa"), None
    from spp_cli.io.checkpoint import load_model

    return load_model(spec)


def _calibration(model, tokenizer, args) -> tuple:
    import torch

    if args.calib and tokenizer is not None:
        from spp_cli.data.sources import calibration_windows

        return calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, seed=0), args.calib
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=generator)
    return ids, "random token ids"


def run_worker(args) -> None:
    """Load, prune and measure one (model, method); write the result as JSON to --worker-result."""
    start_process = time.perf_counter()
    import torch

    from pruners import parse_pattern
    from pruners.sequential import PruneOptions, prunable_linears, prune_model

    model, tokenizer = _load(args.worker_model)
    calibration, source = _calibration(model, tokenizer, args)
    pattern = parse_pattern(args.pattern, args.sparsity)
    rss_before = common.process_status_mb("VmRSS")
    blocks = []
    start = time.perf_counter()
    reports = prune_model(model, None if args.worker_method == "magnitude" else calibration,
                          PruneOptions(args.worker_method, pattern, device=args.device), on_block=blocks.append)
    prune_seconds = time.perf_counter() - start
    linears = prunable_linears(model)
    zeros = sum(int((linear.weight == 0).sum()) for linear in linears.values())
    total = sum(linear.weight.numel() for linear in linears.values())
    errors = [b.reconstruction_error for b in blocks if b.reconstruction_error == b.reconstruction_error]
    result = {
        "model": args.worker_model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "method": args.worker_method,
        "pattern": str(pattern),
        "sparsity_target": pattern.sparsity,
        "overall_sparsity": round(zeros / total, 6),
        "calibration": {"source": source if args.worker_method != "magnitude" else "none (magnitude)",
                        "nsamples": args.nsamples, "seqlen": args.seqlen},
        "setup_seconds": round(start - start_process, 3),
        "prune_seconds": round(prune_seconds, 3),
        "solve_seconds": round(sum(r.seconds for r in reports), 3),
        "block_seconds": [round(b.seconds, 3) for b in blocks],
        "mean_block_reconstruction_error": round(sum(errors) / len(errors), 6) if errors else None,
        "rss_before_prune_mb": round(rss_before, 1),
        "peak_rss_mb": round(common.peak_rss_mb(), 1),
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.worker_result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# driver: one subprocess per (model, method)


def run_spp(model_spec: str, method: str, args) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        result_file = Path(scratch) / "result.json"
        command = [sys.executable, "-m", "benchmarks.prune", "--worker", "--worker-model", model_spec,
                   "--worker-method", method, "--worker-result", str(result_file), "--pattern", args.pattern,
                   "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device]
        if args.sparsity is not None:
            command += ["--sparsity", str(args.sparsity)]
        if args.calib:
            command += ["--calib", args.calib]
        start = time.perf_counter()
        completed = subprocess.run(command, cwd=common.REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if completed.returncode != 0:
            return {"model": model_spec, "method": method, "failed": completed.stderr.strip().splitlines()[-1:]}
        result = json.loads(result_file.read_text())
    return {"process_seconds": round(seconds, 3), **result}


def run_own_benchmark(args, methods: list[str]) -> dict:
    """Every (model, method) in its own subprocess; the report as a dict."""
    models, skipped = [], {}
    if not args.skip_random:
        models.append(RANDOM_LLAMA)
    if not args.skip_tiny:
        if (common.TINY_DIR / "config.json").is_file():
            models.append(common.TINY)
        else:
            skipped[common.TINY] = "spp_cli/assets/tiny-llama not available"
    if args.model:
        models.append(args.model)
    runs = []
    for model_spec in models:
        for method in methods:
            run = run_spp(model_spec, method, args)
            runs.append(run)
            print(json.dumps(run), flush=True)
    import torch  # noqa: F401  (machine_info reports its version)
    import transformers  # noqa: F401

    return {
        "benchmark": "spp prune (pruners.sequential.prune_model)",
        "config": {"pattern": args.pattern, "sparsity": args.sparsity, "nsamples": args.nsamples,
                   "seqlen": args.seqlen, "device": args.device, "methods": methods, "smoke": args.smoke},
        "machine": common.machine_info(),
        "runs": runs,
        "skipped": skipped,
        "peer": None,  # see --peer llmcompressor
        "created": common.timestamp(),
    }


def apply_smoke(args, parser: argparse.ArgumentParser) -> None:
    """--smoke: small sizes wherever the option was left at its default; the random h1024 model skipped."""
    for key, value in SMOKE.items():
        if getattr(args, key) == parser.get_default(key):
            setattr(args, key, value)
    args.skip_random = True
    if args.methods is None:
        args.methods = "wanda"


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = int(os.environ.get("OMP_NUM_THREADS") or 2)
    if args.worker:
        if args.worker_calibration:
            from benchmarks.prune_matched import run_matched_worker

            run_matched_worker(args, STARTED)
        else:
            run_worker(args)
        return
    if args.smoke:
        apply_smoke(args, parser)
    allowed = PEER_METHODS if args.peer else METHODS
    methods = [m.strip() for m in (args.methods or ",".join(allowed)).split(",") if m.strip()]
    unknown = set(methods) - set(allowed)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}: use {', '.join(allowed)}")
    if args.memory:
        from benchmarks.prune_memory import run_memory_benchmark

        report, name = run_memory_benchmark(args, methods), "prune_memory"
    elif args.peer:
        from benchmarks.prune_peer import run_peer_benchmark

        report, name = run_peer_benchmark(args, methods), "prune_peer"
    else:
        report, name = run_own_benchmark(args, methods), "prune"
    common.write_json(report, args.out or common.default_out(name, args.smoke))


if __name__ == "__main__":
    main()

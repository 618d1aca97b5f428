"""Benchmark one-shot pruning: seconds and peak memory per method, as JSON.

Each (model, method) runs in a fresh subprocess, so the numbers are independent of each other:
  process_seconds   wall time of the whole subprocess (interpreter start, imports, model build/load, pruning)
  prune_seconds     the prune_model(...) call alone (capture, forward passes, statistics, solves)
  solve_seconds     the sum of the per-layer LayerReport.seconds (mask choice and weight update only: the papers'
                    "time spent on pruning, without the forward passes")
  peak_rss_mb       the subprocess's peak resident memory (ru_maxrss); rss_before_prune_mb is its RSS with the
                    model loaded, just before pruning, so the difference is what pruning itself adds

Models: a random-init LLaMA (hidden 1024, intermediate 2816, 8 blocks, 16 heads, vocab 32000) always; the shipped
tiny model (builtin:tiny-llama) when spp_cli can load it; and --model PATH when given. Calibration: 64 x 256
random token ids by default (timing does not depend on the text); with --calib SOURCE and a model that has a
tokenizer, windows come from spp_cli.data.calibration_windows.

  OMP_NUM_THREADS=2 python scripts/bench_prune.py --out bench_out/prune.json

--peer llmcompressor is reserved for running the same workload through llm-compressor's SparseGPT/Wanda in its
own virtual environment (--peer-python). It is NOT implemented yet: asking for it exits with an error, and no
peer numbers are ever written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RANDOM_LLAMA = "random-llama-h1024-b8"
TINY = "builtin:tiny-llama"
METHODS = ("magnitude", "wanda", "sparsegpt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="--peer llmcompressor is not implemented yet (the option exists so that the mode can be added "
               "without changing the JSON layout); it exits with an error rather than report numbers.",
    )
    parser.add_argument("--model", help="an extra model to benchmark: a local HF directory or builtin:NAME")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all three)")
    parser.add_argument("--pattern", default="unstructured", help="unstructured or N:M (default unstructured)")
    parser.add_argument("--sparsity", type=float, default=None, help="default 0.5 (N/M for N:M)")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--calib", default=None, help="calibration SOURCE for models with a tokenizer "
                                                      "(default: random token ids)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-random", action="store_true", help="skip the random-init hidden-1024 LLaMA")
    parser.add_argument("--skip-tiny", action="store_true", help="skip builtin:tiny-llama")
    parser.add_argument("--out", default="bench_out/prune.json")
    parser.add_argument("--peer", choices=["llmcompressor"], default=None,
                        help="NOT IMPLEMENTED: also run a peer library in its own venv (see --peer-python)")
    parser.add_argument("--peer-python", default=None, help="the peer's venv python (for --peer)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-model", help=argparse.SUPPRESS)
    parser.add_argument("--worker-method", help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# worker: one (model, method) in this process


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _load(spec: str):
    """(model, tokenizer or None) for RANDOM_LLAMA, builtin:NAME or a local directory."""
    import torch
    import transformers

    if spec == RANDOM_LLAMA:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=16, max_position_embeddings=2048, attn_implementation="sdpa",
        )
        return transformers.LlamaForCausalLM(config).eval(), None
    try:
        from spp_cli.checkpoint import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        return load_model(spec)
    if spec.startswith("builtin:"):
        raise SystemExit(f"{spec} needs spp_cli.checkpoint.load_model, which is not available")
    model = transformers.AutoModelForCausalLM.from_pretrained(spec, dtype="auto").eval()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def _calibration(model, tokenizer, args) -> tuple:
    import torch

    if args.calib and tokenizer is not None:
        from spp_cli.data import calibration_windows

        return calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, seed=0), args.calib
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=generator)
    return ids, "random token ids"


def run_worker(args) -> None:
    start_process = time.perf_counter()
    import torch

    sys.path.insert(0, str(REPO))
    from pruners import parse_pattern
    from pruners.sequential import prunable_linears, prune_model

    model, tokenizer = _load(args.worker_model)
    calibration, source = _calibration(model, tokenizer, args)
    pattern = parse_pattern(args.pattern, args.sparsity)
    rss_before = _rss_mb()
    blocks = []
    start = time.perf_counter()
    reports = prune_model(model, None if args.worker_method == "magnitude" else calibration, args.worker_method,
                          pattern, device=args.device, on_block=blocks.append)
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
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.worker_result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# driver: one subprocess per (model, method)


def run_spp(model_spec: str, method: str, args) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        result_file = Path(scratch) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--worker-model", model_spec,
                   "--worker-method", method, "--worker-result", str(result_file), "--pattern", args.pattern,
                   "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device]
        if args.sparsity is not None:
            command += ["--sparsity", str(args.sparsity)]
        if args.calib:
            command += ["--calib", args.calib]
        start = time.perf_counter()
        completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if completed.returncode != 0:
            return {"model": model_spec, "method": method, "failed": completed.stderr.strip().splitlines()[-1:]}
        result = json.loads(result_file.read_text())
    return {"process_seconds": round(seconds, 3), **result}


def run_peer_llmcompressor(model_spec: str, method: str, args) -> dict:
    """Reserved: the same workload through llm-compressor, in its own venv (`args.peer_python`).

    Not implemented. The intended shape: write a small script that builds the same model (same seed/config),
    the same calibration ids, runs llmcompressor's oneshot with SparseGPTModifier / WandaPruningModifier
    (sparsity, mask_structure) on CPU, and prints the same fields as `run_worker`; time it the same way.
    """
    raise NotImplementedError("--peer llmcompressor is not implemented yet; no peer numbers are produced")


def tiny_available() -> bool:
    try:
        sys.path.insert(0, str(REPO))
        from spp_cli.checkpoint import load_model  # noqa: F401
    except ImportError:
        return False
    return (REPO / "spp_cli" / "assets" / "tiny-llama").is_dir()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    if args.peer:
        raise SystemExit("--peer llmcompressor is not implemented yet (see --help); no peer numbers are produced")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}: use {', '.join(METHODS)}")
    models, skipped = [], {}
    if not args.skip_random:
        models.append(RANDOM_LLAMA)
    if not args.skip_tiny:
        if tiny_available():
            models.append(TINY)
        else:
            skipped[TINY] = "spp_cli.checkpoint or spp_cli/assets/tiny-llama not available"
    if args.model:
        models.append(args.model)
    runs = []
    for model_spec in models:
        for method in methods:
            run = run_spp(model_spec, method, args)
            runs.append(run)
            print(json.dumps(run), flush=True)
    import torch
    import transformers

    report = {
        "benchmark": "spp prune (pruners.sequential.prune_model)",
        "config": {"pattern": args.pattern, "sparsity": args.sparsity, "nsamples": args.nsamples,
                   "seqlen": args.seqlen, "device": args.device, "methods": methods},
        "machine": {"cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "loadavg_at_end": list(os.getloadavg())},
        "runs": runs,
        "skipped": skipped,
        "peer": None,  # --peer llmcompressor: not implemented
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

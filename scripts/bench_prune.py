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

  OMP_NUM_THREADS=2 python scripts/bench_prune.py --out bench_out/prune.json

--peer llmcompressor runs the same pruning through spp and through llm-compressor (scripts/bench_peer_llmcompressor.py,
in its own virtual environment, created on first use at .bench-venvs/llmcompressor: torch==2.13.0 first, then
llmcompressor==0.14.0.1, which pins transformers 5.15-5.17). Both tools get the same model directory (--peer-models:
the shipped tiny model, snapshotted; random-init LLaMAs saved once as safetensors, hidden 1024 fp32 and hidden 256 GQA
fp16; any LABEL=DIR), the same calibration windows (drawn once with data.sources.calibration_windows from --calib
with the tiny model's tokenizer, or a LABEL=DIR model's own, handed to both as input_ids), the same method, sparsity,
pattern, seqlen and thread count. Runs alternate spp, peer, spp, peer, ... (with --baseline-checkout DIR, the spp of
that checkout too, whose pruned weights must be bit-identical), each in a fresh subprocess, and each reports:
  process_seconds   from the driver's spawn of the child to the child holding the pruned model in memory with its
                    decoder linears written to a safetensors file: interpreter start, imports, model load
                    (from_pretrained, dtype auto; neither tool loads a tokenizer, since both are handed token ids),
                    reading the calibration windows, pruning, that save. Interpreter teardown and anything measured
                    afterwards are excluded. (A baseline checkout older than this rule loads the tokenizer too.)
  prune_seconds     spp: the prune_model(...) call; llm-compressor: the oneshot(...) call (dataset -> dataloader,
                    tracing, calibration passes, solves)
  peak_rss_mb       the child's peak RSS (VmHWM) when the pruned weights are saved (not ru_maxrss: Linux carries
                    that across exec, so every child would report at least the driver's RSS)
and, for spp's runs, measured after the result in the same child (time_plain_forwards): forward_two_passes_seconds,
two plain forward passes of every calibration window through every block (captured block inputs replayed with
pruners.blocks.block_outputs, batch 1), the floor the issue's "Wanda within 1.5x of two forward passes per block"
target refers to; and forward_floor_seconds, per block a pass stopped at the last linear's input plus a whole pass, in
spp's forward chunks: the forwards no pruner keeping these masks can skip. The summary's forward_floor turns it into
the best spp/peer ratio any such pruner could reach with these kernels. The driver then checks the sparsity of
every pruned linear of both tools, compares their masks, and (tiny model) computes the WikiText-2 token perplexity of
both results in this venv with spp_cli.eval.perplexity.token_perplexity at the calibration seqlen on the same stream.

  .venv/bin/python scripts/bench_prune.py --peer llmcompressor --threads 2 --out bench_out/prune_peer.json
  git worktree add --detach /tmp/spp-before f4c4aee   # spp before the calibration-pass changes
  .venv/bin/python scripts/bench_prune.py --peer llmcompressor --peer-models random-llama-h256-gqa-b4,\
      random-llama-h1024-b8,gemma3-270m=$HOME/.cache/spp-real-models/gemma3-270m-hf --baseline-checkout /tmp/spp-before

--memory runs the prune stage (streaming on, then off) on random-init hidden-1024 LLaMAs of 4, 16 and 32 blocks
saved to disk, one subprocess each, and reports their peak RSS against depth (scripts/bench_prune_memory.py):

  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_prune.py --memory --methods wanda --nsamples 8 --seqlen 128
"""

from __future__ import annotations

import argparse
import hashlib
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

STARTED = time.time()  # a worker's process start (this module imports only the standard library)
REPO = Path(__file__).resolve().parent.parent
RANDOM_LLAMA = "random-llama-h1024-b8"
RANDOM_GQA = "random-llama-h256-gqa-b4"
TINY = "builtin:tiny-llama"
METHODS = ("magnitude", "wanda", "sparsegpt")
PEER_METHODS = ("wanda", "sparsegpt")  # what llm-compressor has (its magnitude modifier is a schedule, not one-shot)
PEER_SCRIPT = REPO / "scripts" / "bench_peer_llmcompressor.py"
SCRIPT_NAME = "bench_prune.py"
PEER_REQUIREMENTS = ("torch==2.13.0", "llmcompressor==0.14.0.1")  # installed in this order, one pip call each
SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_CALIB = SHARED_DATA / "c4" / "c4-train.00000-of-01024.first1000.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="With --peer llmcompressor the own-benchmark options --model/--device/--methods magnitude do not apply; "
               "see the module docstring for what each number includes.",
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
    parser.add_argument("--out", default=None,
                        help="default bench_out/prune.json (bench_out/prune_peer.json with --peer)")
    parser.add_argument("--peer", choices=["llmcompressor"], default=None,
                        help="compare with llm-compressor's oneshot, alternating runs (its venv is made on first use)")
    parser.add_argument("--peer-venv", default=".bench-venvs/llmcompressor", help="where the peer's venv lives")
    parser.add_argument("--peer-python", default=None, help="use this interpreter for the peer (no venv is made)")
    parser.add_argument("--threads", type=int, default=None,
                        help="--peer: CPU threads for both tools (OMP_NUM_THREADS and torch.set_num_threads; "
                             "default: $OMP_NUM_THREADS or 2)")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="--peer: OMP_WAIT_POLICY for both tools (default PASSIVE: with the default spinning, two "
                             "threads on a 2-core machine shared with other work ran each small matmul ~40x slower)")
    parser.add_argument("--peer-models", default=f"tiny-llama,{RANDOM_LLAMA}",
                        help=f"--peer: comma-separated models: tiny-llama, {RANDOM_LLAMA}, {RANDOM_GQA} (hidden 256, "
                             "4 blocks, 2 KV heads, fp16) or LABEL=DIR for a local HF directory, whose own tokenizer "
                             "draws its windows (e.g. gemma3-270m=DIR from ../shared/models/gemma3-270m.sh)")
    parser.add_argument("--baseline-checkout", default=None,
                        help="--peer: also run the spp of this checkout (e.g. a git worktree of an earlier commit) "
                             "in the alternation, and check that its pruned weights are bit-identical to this one's")
    parser.add_argument("--sparsity-profile", choices=["uniform", "owl"], default="uniform",
                        help="--peer: owl gives both tools OWL's per-block sparsity (spp sparsity_profile='owl'; "
                             "llm-compressor sparsity_profile='owl', owl_m, owl_lmbda) and compares their block ratios")
    parser.add_argument("--owl-threshold", type=float, default=5.0, help="--sparsity-profile owl: M (an integer for "
                        "llm-compressor, which types owl_m as int)")
    parser.add_argument("--owl-lambda", type=float, default=0.08, help="--sparsity-profile owl: lambda")
    parser.add_argument("--repeats", type=int, default=3, help="--peer: runs per tool on the tiny model")
    parser.add_argument("--repeats-random", type=int, default=2,
                        help="--peer: runs per tool on every other model")
    parser.add_argument("--data-dir", default=str(SHARED_DATA),
                        help="--peer: directory holding wikitext-2-raw-v1/test.jsonl for the perplexity")
    parser.add_argument("--memory", action="store_true",
                        help="peak RSS of the prune stage against depth, streaming and in memory")
    parser.add_argument("--depths", default=None, help="--memory: block counts (default 4,16,32)")
    parser.add_argument("--scratch", default=None, help="--memory: where the models are saved (default: $TMPDIR)")
    parser.add_argument("--memory-repeats", type=int, default=1,
                        help="--memory: streaming on, off, on, off, ... this many times per depth (default 1)")
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


def _rss_mb(field: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (peak) of this process image, in MB. The peak is read here rather than from ru_maxrss,
    which Linux carries across exec: a child spawned by a driver holding a model would report the driver's RSS."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
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
        from spp_cli.data.sources import calibration_windows

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
    from pruners.sequential import PruneOptions, prunable_linears, prune_model

    model, tokenizer = _load(args.worker_model)
    calibration, source = _calibration(model, tokenizer, args)
    pattern = parse_pattern(args.pattern, args.sparsity)
    rss_before = _rss_mb()
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
        "peak_rss_mb": round(_rss_mb("VmHWM"), 1),
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


# ---------------------------------------------------------------------------------------------------------------
# --peer llmcompressor, worker side: the spp half of one matched run (the peer half is bench_peer_llmcompressor.py)


def run_matched_worker(args) -> None:
    """Prune a model directory with spp exactly as the peer script does with llm-compressor; write a JSON result."""
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from safetensors.torch import load_file, save_file

    from pruners import parse_pattern
    from pruners.sequential import PruneOptions, prunable_linears, prune_model
    from spp_cli.checkpoint import load_model

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
        "started": STARTED,
        "imports_seconds": round(imported - STARTED, 3), "load_seconds": round(loaded - imported, 3),
        "prune_seconds": round(pruned - loaded, 3), "save_seconds": round(done - pruned, 3), "done": done,
        "solve_seconds": round(sum(report.seconds for report in reports), 3),  # mask choice + update, no forwards
        "peak_rss_mb": round(_rss_mb("VmHWM"), 1),
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


# ---------------------------------------------------------------------------------------------------------------
# --peer llmcompressor, driver side


def ensure_peer_venv(venv: Path) -> Path:
    """The peer venv's python; create the venv (torch CPU wheel first, then llmcompressor) unless it works already."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import llmcompressor, sys; sys.exit(llmcompressor.__version__ != '0.14.0.1')"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating the llm-compressor venv at {venv} (once; later runs reuse it)", file=sys.stderr, flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    # torch goes first, pinned: a bare `torch` requirement resolved by llmcompressor would pull a CUDA build
    for requirement in PEER_REQUIREMENTS:
        subprocess.run([str(python), "-m", "pip", "install", requirement], check=True)
    if subprocess.run(probe, capture_output=True).returncode != 0:
        raise SystemExit(f"{venv}: llmcompressor 0.14.0.1 does not import after installing; remove the venv and retry")
    return python


def save_random_llama(directory: Path, tokenizer_from: Path, shape: str = RANDOM_LLAMA) -> Path:
    """A random-init LLaMA (seed 0) as safetensors, with a tokenizer so the peer can load one: RANDOM_LLAMA (hidden
    1024, 8 blocks, fp32) or RANDOM_GQA (hidden 256, intermediate 688, 4 blocks, 4 heads over 2 KV heads, vocab 4096,
    fp16 on disk: the shape of the issue's trained model)."""
    import torch
    import transformers

    torch.manual_seed(0)
    if shape == RANDOM_GQA:
        config = transformers.LlamaConfig(
            vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048,
        )
        transformers.LlamaForCausalLM(config).to(torch.float16).save_pretrained(directory)
    else:
        config = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=16, max_position_embeddings=2048,
        )
        transformers.LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_from / name, directory / name)
    return directory


def run_matched(tool: str, model_dir: Path, method: str, calibration: Path, weights_out: Path, peer_python: Path,
                args, log: Path, forward_baseline: bool = True) -> dict:
    """One child process of `tool` (spp or llmcompressor); its JSON result plus the driver's own measurements.
    forward_baseline: spp's runs also time plain forward passes (time_plain_forwards, after the result is measured)."""
    result_file = weights_out.with_suffix(".json")
    if tool in ("spp", "spp-baseline"):
        script = Path(__file__).resolve() if tool == "spp" else Path(args.baseline_checkout) / "scripts" / SCRIPT_NAME
        command = [sys.executable, str(script), "--worker", "--worker-model", str(model_dir),
                   "--worker-method", method, "--worker-result", str(result_file), "--worker-calibration",
                   str(calibration), "--worker-weights-out", str(weights_out), "--pattern", args.pattern,
                   "--threads", str(args.threads)]
        if args.sparsity is not None:
            command += ["--sparsity", str(args.sparsity)]
        if forward_baseline and tool == "spp":
            command.append("--worker-forward-baseline")
        if args.sparsity_profile != "uniform":  # (a baseline checkout older than OWL knows no such option)
            command += ["--sparsity-profile", args.sparsity_profile, "--owl-threshold", str(args.owl_threshold),
                        "--owl-lambda", str(args.owl_lambda)]
    else:
        command = [str(peer_python), str(PEER_SCRIPT), "--model", str(model_dir), "--method", method,
                   "--sparsity", str(args.pattern_spec.sparsity), "--mask-structure", args.mask_structure,
                   "--calibration", str(calibration), "--threads", str(args.threads),
                   "--weights-out", str(weights_out), "--result", str(result_file)]
        if args.sparsity_profile == "owl":
            command += ["--sparsity-profile", "owl", "--owl-m", str(int(args.owl_threshold)),
                        "--owl-lmbda", str(args.owl_lambda)]
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                   "OMP_WAIT_POLICY": args.omp_wait_policy, "TOKENIZERS_PARALLELISM": "false"}
    load_before = os.getloadavg()[0]
    with log.open("a") as handle:
        handle.write(f"\n===== {tool} {method} {model_dir.name}\n")
        handle.flush()
        spawned = time.time()
        completed = subprocess.run(command, cwd=REPO, env=environment, stdout=handle, stderr=subprocess.STDOUT)
        exited = time.time()
    if completed.returncode != 0:
        raise SystemExit(f"{tool} {method} on {model_dir.name} failed (exit {completed.returncode}); see {log}")
    result = json.loads(result_file.read_text())
    result["process_seconds"] = round(result.pop("done") - spawned, 3)
    result["interpreter_start_seconds"] = round(result.pop("started") - spawned, 3)
    result["subprocess_seconds"] = round(exited - spawned, 3)  # includes teardown (and spp's forward baseline)
    result["loadavg_1min_before"] = round(load_before, 2)
    return result


def read_linears(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def weights_sha256(weights: dict) -> str:
    import torch

    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def owl_block_targets(run: dict) -> dict[int, float] | None:
    """Block index -> the OWL sparsity a tool's run chose (spp: a list of rows; llm-compressor: name -> value)."""
    found = run.get("owl_block_sparsity")
    if isinstance(found, list):
        return {row["block"]: row["sparsity"] for row in found}
    return {int(name.rsplit(".", 1)[1]): value for name, value in found.items()} if found else None


def check_sparsity(weights: dict, pattern, block_targets: dict[int, float] | None = None) -> dict:
    """Per-linear sparsity of a pruned model's decoder linears against the pattern (and N:M structure), or with
    OWL against each block's own target (Wanda keeps int(c*s) zeros per row: up to 1/c below it)."""
    layer_sparsity = {name: float((weight == 0).float().mean()) for name, weight in weights.items()}
    zeros = sum(int((weight == 0).sum()) for weight in weights.values())
    total = sum(weight.numel() for weight in weights.values())
    # wanda keeps int(c*s) per row, sparsegpt one <= threshold per 128-column block (a few ties over the target)
    ok = all(abs(value - pattern.sparsity) <= 0.005 for value in layer_sparsity.values())
    if block_targets is not None:
        ok = all(abs(value - block_targets[int(name.split(".layers.")[1].split(".")[0])])
                 <= max(0.005, 1 / weights[name].shape[1]) for name, value in layer_sparsity.items())
    if pattern.is_nm:
        ok = ok and all(bool(((weight.reshape(weight.shape[0], -1, pattern.m) == 0).sum(-1) >= pattern.n).all())
                        for weight in weights.values())
    return {"overall": round(zeros / total, 6), "min_layer": round(min(layer_sparsity.values()), 6),
            "max_layer": round(max(layer_sparsity.values()), 6), "linears": len(weights), "matches_target": ok}


def compare_weights(ours: dict, theirs: dict) -> dict:
    """How far spp's pruned linears are from the peer's: mask agreement and largest weight difference."""
    same_mask = sum(int(((ours[name] == 0) == (theirs[name] == 0)).sum()) for name in ours)
    total = sum(weight.numel() for weight in ours.values())
    difference = max(float((ours[name].float() - theirs[name].float()).abs().max()) for name in ours)
    return {"mask_agreement": round(same_mask / total, 6), "max_abs_weight_difference": difference}


PERPLEXITY_STREAMS = ("wikitext2", "ppl:builtin:python-docs:test")  # the stream; the tiny model's own domain


def perplexities(model_dir: Path, results: dict[str, Path], seqlen: int, data_dir: str) -> dict:
    """Token perplexity (spp_cli.eval.perplexity, batch 8) of the dense model and of each pruned result, whose decoder
    linears are swapped into the one loaded model, on WikiText-2 test and on the tiny model's python-docs test."""
    from safetensors.torch import load_file

    from spp_cli.checkpoint import load_model
    from spp_cli.eval.perplexity import perplexity_stream, token_perplexity

    model, tokenizer = load_model(str(model_dir))
    streams = {task: perplexity_stream(task, tokenizer, seqlen, data_dir)[0] for task in PERPLEXITY_STREAMS}
    values = {task: {"seqlen": seqlen, "windows": stream.shape[1] // seqlen} for task, stream in streams.items()}
    for label, weights_file in {"dense": None, **results}.items():  # labels: "dense", "METHOD/TOOL"
        if weights_file is not None:
            _, unexpected = model.load_state_dict(load_file(weights_file), strict=False)
            if unexpected:
                raise SystemExit(f"{weights_file}: weights the model does not have: {unexpected[:3]}")
        for task, stream in streams.items():
            values[task][label] = round(token_perplexity(model, stream, seqlen, batch_size=8)["value"], 4)
    return values


def summarize(label: str, method: str, runs: dict[str, list[dict]], checks: dict, perplexity: dict | None) -> dict:
    """Medians per tool, ratios spp/peer and the issue's targets for one (model, method)."""
    keys = ("process_seconds", "prune_seconds", "peak_rss_mb")
    medians = {tool: {key: round(statistics.median(run[key] for run in tool_runs), 3) for key in keys}
               for tool, tool_runs in runs.items()}
    ratios = {key: round(medians["spp"][key] / medians["llmcompressor"][key], 3) for key in keys}
    summary = {"model": label, "method": method, "repeats": len(runs["spp"]), "median": medians,
               "ratio_spp_over_peer": ratios, "checks": checks, "perplexity": perplexity}
    targets = {
        "process_seconds <= 0.6x peer": ratios["process_seconds"] <= 0.6,
        "prune_seconds <= 0.6x peer": ratios["prune_seconds"] <= 0.6,
        "peak_rss_mb <= peer": ratios["peak_rss_mb"] <= 1.0,
    }
    if "spp-baseline" in medians:
        summary["ratio_spp_over_baseline"] = {
            key: round(medians["spp"][key] / medians["spp-baseline"][key], 3) for key in keys}
        targets["weights bit-identical to the baseline checkout"] = checks["spp_vs_baseline"]["identical_weights"]
    for task, values in (perplexity or {}).items():
        values["relative_difference_spp_vs_peer"] = round(values["spp"] / values["llmcompressor"] - 1, 5)
        targets[f"{task} perplexity within 1% of peer"] = abs(values["relative_difference_spp_vs_peer"]) <= 0.01
    if method == "wanda" and all("forward_two_passes_seconds" in run for run in runs["spp"]):
        baseline = statistics.median(run["forward_two_passes_seconds"] for run in runs["spp"])
        capture = statistics.median(run["forward_capture_seconds"] for run in runs["spp"])
        summary["spp_forward_two_passes_seconds"] = round(baseline, 3)
        summary["spp_forward_capture_seconds"] = round(capture, 3)
        summary["spp_wanda_prune_over_two_passes"] = round(medians["spp"]["prune_seconds"] / baseline, 3)
        summary["spp_wanda_prune_over_two_passes_plus_capture"] = round(
            medians["spp"]["prune_seconds"] / (baseline + capture), 3)
        targets["wanda prune <= 1.5x two forward passes"] = summary["spp_wanda_prune_over_two_passes"] <= 1.5
    if all("forward_floor_seconds" in run for run in runs["spp"]):
        summary["forward_floor"] = forward_floor(medians, runs)
    summary["targets_met"] = targets
    summary["runs"] = runs
    return summary


def forward_floor(medians: dict, runs: dict) -> dict:
    """What the floor forwards (time_plain_forwards) leave for the ratio to the peer.

    best_process_ratio: spp's process with its prune call replaced by the capture and the floor forwards alone (no
    hook, statistic or solve), over the peer's process; no pruner keeping these masks, with these kernels, does
    better. peer_prune_over_two_passes: how much of the peer's oneshot call is beyond two batch-1 passes."""
    floor = statistics.median(run["forward_floor_seconds"] for run in runs["spp"])
    capture = statistics.median(run["forward_capture_seconds"] for run in runs["spp"])
    two_passes = statistics.median(run["forward_two_passes_seconds"] for run in runs["spp"])
    spp, peer = medians["spp"], medians["llmcompressor"]
    outside_prune = spp["process_seconds"] - spp["prune_seconds"]
    return {"floor_seconds": round(floor, 3), "capture_seconds": round(capture, 3),
            "chunk_windows": runs["spp"][0]["forward_floor_chunk_windows"],
            "spp_prune_over_floor_plus_capture": round(spp["prune_seconds"] / (floor + capture), 3),
            "peer_prune_over_two_passes": round(peer["prune_seconds"] / two_passes, 3),
            "best_prune_ratio": round((floor + capture) / peer["prune_seconds"], 3),
            "best_process_ratio": round((outside_prune + floor + capture) / peer["process_seconds"], 3)}


def run_alternating(label: str, model_dir: Path, method: str, repeats: int, calibration: Path, scratch: Path,
                    peer_python: Path, args, log: Path) -> tuple[dict, dict, dict]:
    """spp, peer, spp, peer, ... `repeats` times each; returns (runs per tool, checks, first weights file per tool)."""
    tools = ["spp", "llmcompressor"] + (["spp-baseline"] if args.baseline_checkout else [])
    runs: dict[str, list[dict]] = {tool: [] for tool in tools}
    hashes: dict[str, set] = {tool: set() for tool in tools}
    first: dict[str, Path] = {}
    for repeat in range(repeats):
        for tool in runs:
            weights_file = scratch / f"{label}-{method}-{tool}-{repeat}.safetensors"
            run = run_matched(tool, model_dir, method, calibration, weights_file, peer_python, args, log)
            weights = read_linears(weights_file)
            run["sparsity"] = check_sparsity(weights, args.pattern_spec, owl_block_targets(run))
            hashes[tool].add(weights_sha256(weights))
            runs[tool].append(run)
            first.setdefault(tool, weights_file)
            print(f"{label} {method} {tool} #{repeat + 1}: process {run['process_seconds']} s, prune "
                  f"{run['prune_seconds']} s, peak RSS {run['peak_rss_mb']} MB", flush=True)
    checks = {
        "sparsity_matches_target": {tool: all(run["sparsity"]["matches_target"] for run in tool_runs)
                                    for tool, tool_runs in runs.items()},
        "identical_weights_across_repeats": {tool: len(found) == 1 for tool, found in hashes.items()},
        "spp_vs_peer": compare_weights(read_linears(first["spp"]), read_linears(first["llmcompressor"])),
    }
    if "spp-baseline" in first:  # the same windows and options through an earlier spp: the masks must not move
        checks["spp_vs_baseline"] = {"identical_weights": hashes["spp"] == hashes["spp-baseline"],
                                     "baseline_checkout": str(args.baseline_checkout)}
        first.pop("spp-baseline")  # the perplexity of bit-identical weights would be the same
    return runs, checks, first


def run_peer_benchmark(args, methods: list[str]) -> dict:
    """Alternating spp / llm-compressor runs on the tiny and the random model; the report as a dict."""
    sys.path.insert(0, str(REPO))
    import torch
    import transformers
    from safetensors.torch import save_file

    from pruners import parse_pattern
    from spp_cli.checkpoint import load_model
    from spp_cli.data.sources import calibration_windows

    torch.set_num_threads(args.threads)
    args.pattern_spec = parse_pattern(args.pattern, args.sparsity)
    args.mask_structure = (f"{args.pattern_spec.n}:{args.pattern_spec.m}" if args.pattern_spec.is_nm else "0:0")
    peer_python = Path(args.peer_python) if args.peer_python else ensure_peer_venv(REPO / args.peer_venv)
    load_at_start = os.getloadavg()
    report_models, summaries, peer_versions = {}, [], None
    with tempfile.TemporaryDirectory(prefix="bench-prune-peer-") as scratch_name:
        scratch = Path(scratch_name)
        log = scratch / "children.log"
        tiny = scratch / "tiny-llama"  # a snapshot: the shipped directory may be replaced while this runs
        shutil.copytree(REPO / "spp_cli" / "assets" / "tiny-llama", tiny)
        _, tokenizer = load_model(str(tiny))
        calibration_ids = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)
        calibration = scratch / "calibration.safetensors"
        save_file({"input_ids": calibration_ids.contiguous()}, calibration)
        models = []
        for spec in [name.strip() for name in args.peer_models.split(",") if name.strip()]:
            if spec == "tiny-llama":
                models.append(("tiny-llama", tiny, args.repeats, True, calibration))
            elif spec in (RANDOM_LLAMA, RANDOM_GQA):
                models.append((spec, save_random_llama(scratch / spec, tiny, spec), args.repeats_random, False,
                               calibration))
            elif "=" in spec:  # a local model with its own tokenizer: its own windows from the same source
                label, directory = spec.split("=", 1)
                _, own_tokenizer = load_model(directory)
                own = scratch / f"calibration-{label}.safetensors"
                save_file({"input_ids": calibration_windows(own_tokenizer, args.calib, args.nsamples, args.seqlen,
                                                            seed=0).contiguous()}, own)
                models.append((label, Path(directory), args.repeats_random, False, own))
            else:
                raise SystemExit(f"--peer-models: unknown model {spec!r}: use tiny-llama, {RANDOM_LLAMA}, "
                                 f"{RANDOM_GQA} or LABEL=DIR")
        for label, model_dir, repeats, evaluate, calibration in models:
            weights_sha = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
            report_models[label] = {"directory": str(model_dir), "model_safetensors_sha256": weights_sha,
                                    "config": json.loads((model_dir / "config.json").read_text())}
            measured = {method: run_alternating(label, model_dir, method, repeats, calibration, scratch, peer_python,
                                                args, log) for method in methods}
            results = {f"{method}/{tool}": first for method in methods for tool, first in measured[method][2].items()}
            values = perplexities(model_dir, results, args.seqlen, args.data_dir) if evaluate else None
            for method, (runs, checks, _) in measured.items():
                perplexity = None if values is None else {
                    task: {"seqlen": by_label["seqlen"], "windows": by_label["windows"], "dense": by_label["dense"],
                           **{tool: by_label[f"{method}/{tool}"] for tool in runs if f"{method}/{tool}" in by_label}}
                    for task, by_label in values.items()
                }
                summaries.append(summarize(label, method, runs, checks, perplexity))
                if args.sparsity_profile == "owl":
                    from bench_prune_owl import owl_comparison

                    summaries[-1]["owl"] = owl_comparison(runs, model_dir, calibration_ids, args.pattern_spec.sparsity,
                                                          args.owl_threshold, args.owl_lambda)
                print(json.dumps({key: summaries[-1][key] for key in ("model", "method", "median",
                                  "ratio_spp_over_peer", "targets_met")}), flush=True)
            peer_versions = next(run["versions"] for runs, _, _ in measured.values() for run in runs["llmcompressor"])
    return {
        "benchmark": "spp prune vs llm-compressor oneshot (alternating child processes)",
        "config": {"pattern": str(args.pattern_spec), "mask_structure": args.mask_structure,
                   "sparsity": args.pattern_spec.sparsity, "nsamples": args.nsamples, "seqlen": args.seqlen,
                   "calibration": f"{args.calib} via spp_cli.data.sources.calibration_windows(tiny tokenizer, seed 0), "
                                  "the same input_ids for both tools and both models",
                   "sparsity_profile": args.sparsity_profile,
                   **({"owl_threshold": args.owl_threshold, "owl_lambda": args.owl_lambda}
                      if args.sparsity_profile == "owl" else {}),
                   "methods": methods, "threads": args.threads, "omp_wait_policy": args.omp_wait_policy,
                   "repeats": {label: repeats for label, _, repeats, _, _ in models},
                   "baseline_checkout": args.baseline_checkout,
                   "peer_call": "oneshot(model, dataset=Dataset{input_ids}, recipe=<Modifier>(sparsity, "
                                f"mask_structure={args.mask_structure!r}, targets=[decoder-block class], "
                                "ignore=['re:.*lm_head']" + (
                                    f", sparsity_profile='owl', owl_m={int(args.owl_threshold)}, owl_lmbda="
                                    f"{args.owl_lambda}; two 0.14.0.1 OWL bugs patched around: "
                                    "bench_peer_llmcompressor.work_around_owl_bugs"
                                    if args.sparsity_profile == "owl" else "") + "), "
                                "num_calibration_samples=nsamples, max_seq_length=seqlen, "
                                "shuffle_calibration_samples=False, batch_size=1, pipeline='sequential')",
                   "spp_call": "prune_model(model, input_ids, method, pattern" + (
                       ", sparsity_profile='owl', owl_threshold, owl_lambda" if args.sparsity_profile == "owl" else "")
                   + ") (defaults: batch_size 1, device cpu)"},
        "models": report_models,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_at_start": [round(x, 2) for x in load_at_start],
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"spp_venv": {"torch": torch.__version__, "transformers": transformers.__version__},
                     "peer_venv": peer_versions},
        "results": summaries,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def tiny_available() -> bool:
    try:
        sys.path.insert(0, str(REPO))
        from spp_cli.checkpoint import load_model  # noqa: F401
    except ImportError:
        return False
    return (REPO / "spp_cli" / "assets" / "tiny-llama").is_dir()


def write_report(report: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads is None:
        args.threads = int(os.environ.get("OMP_NUM_THREADS") or 2)
    if args.worker:
        if args.worker_calibration:
            run_matched_worker(args)
        else:
            run_worker(args)
        return
    allowed = PEER_METHODS if args.peer else METHODS
    methods = [m.strip() for m in (args.methods or ",".join(allowed)).split(",") if m.strip()]
    unknown = set(methods) - set(allowed)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}: use {', '.join(allowed)}")
    if args.memory:
        sys.path.insert(0, str(REPO / "scripts"))
        from bench_prune_memory import run_memory_benchmark

        write_report(run_memory_benchmark(args, methods), args.out or "bench_out/prune_memory.json")
        return
    if args.peer:
        sys.path.insert(0, str(REPO / "scripts"))  # bench_prune_owl
        if args.sparsity_profile == "owl" and args.owl_threshold != int(args.owl_threshold):
            raise SystemExit(f"--owl-threshold {args.owl_threshold} must be an integer: llm-compressor's owl_m is")
        # the driver evaluates perplexity itself: same threads and wait policy as the children, set before torch loads
        os.environ.update(OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY=args.omp_wait_policy)
        if args.calib is None:
            args.calib = str(DEFAULT_CALIB) if DEFAULT_CALIB.is_file() else "builtin:python-docs"
        write_report(run_peer_benchmark(args, methods), args.out or "bench_out/prune_peer.json")
        return
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
        "peer": None,  # see --peer llmcompressor
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_report(report, args.out or "bench_out/prune.json")


if __name__ == "__main__":
    main()

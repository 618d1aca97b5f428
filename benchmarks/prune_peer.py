"""`python -m benchmarks.prune --peer llmcompressor`: spp's pruning against llm-compressor's oneshot, alternating.

The peer runs benchmarks/peer_llmcompressor.py in its own virtual environment, created on first use at
.bench-venvs/llmcompressor (torch==2.13.0 first, then llmcompressor==0.14.0.1, which pins transformers 5.15-5.17).
Both tools get the same model directory (--peer-models: the shipped tiny model, snapshotted; random-init LLaMAs saved
once as safetensors, hidden 1024 fp32 and hidden 256 GQA fp16; any LABEL=DIR), the same calibration windows (drawn
once with data.sources.calibration_windows from --calib with the tiny model's tokenizer, or a LABEL=DIR model's own,
handed to both as input_ids), the same method, sparsity, pattern, seqlen and thread count. Runs alternate spp, peer,
spp, peer, ... (with --baseline-checkout DIR, the spp of that checkout too, whose pruned weights must be
bit-identical), each in a fresh subprocess, and each reports:
  process_seconds   from the driver's spawn of the child to the child holding the pruned model in memory with its
                    decoder linears written to a safetensors file: interpreter start, imports, model load
                    (from_pretrained, dtype auto; neither tool loads a tokenizer, since both are handed token ids),
                    reading the calibration windows, pruning, that save. Interpreter teardown and anything measured
                    afterwards are excluded. (A baseline checkout older than this rule loads the tokenizer too.)
  prune_seconds     spp: the prune_model(...) call; llm-compressor: the oneshot(...) call (dataset -> dataloader,
                    tracing, calibration passes, solves)
  peak_rss_mb       the child's peak RSS (VmHWM) when the pruned weights are saved (not ru_maxrss: Linux carries
                    that across exec, so every child would report at least the driver's RSS)
and, for spp's runs, measured after the result in the same child (benchmarks/prune_matched.py, time_plain_forwards):
forward_two_passes_seconds, two plain forward passes of every calibration window through every block (captured block
inputs replayed with pruners.blocks.block_outputs, batch 1), the floor the issue's "Wanda within 1.5x of two forward
passes per block" target refers to; and forward_floor_seconds, per block a pass stopped at the last linear's input
plus a whole pass, in spp's forward chunks: the forwards no pruner keeping these masks can skip. The summary's
forward_floor turns it into the best spp/peer ratio any such pruner could reach with these kernels. The driver then
checks the sparsity of every pruned linear of both tools, compares their masks, and (tiny model) computes the
WikiText-2 token perplexity of both results in this venv with spp_cli.eval.perplexity.token_perplexity at the
calibration seqlen on the same stream (benchmarks/prune_compare.py).

  .venv/bin/python -m benchmarks.prune --peer llmcompressor --threads 2 --out benchmarks/results/prune_peer.json
  git worktree add --detach /tmp/spp-before f4c4aee   # spp before the calibration-pass changes
  .venv/bin/python -m benchmarks.prune --peer llmcompressor --peer-models random-llama-h256-gqa-b4,\
      random-llama-h1024-b8,gemma3-270m=$HOME/.cache/spp-real-models/gemma3-270m-hf --baseline-checkout /tmp/spp-before

--smoke uses the peer only where its venv works already (it never installs one); without it, spp's runs alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.prune_compare import (
    check_sparsity,
    compare_weights,
    owl_block_targets,
    perplexities,
    read_linears,
    summarize,
    weights_sha256,
)

RANDOM_LLAMA = "random-llama-h1024-b8"
RANDOM_GQA = "random-llama-h256-gqa-b4"
RANDOM_SHAPES = {RANDOM_LLAMA: ("h1024", None), RANDOM_GQA: ("h256-gqa", "float16")}  # label -> (shape, dtype)
DEFAULT_CALIB = common.SHARED_DATA / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
SMOKE_PERPLEXITY_WINDOWS = 4


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peer", choices=["llmcompressor"], default=None,
                        help="compare with llm-compressor's oneshot, alternating runs (its venv is made on first use)")
    parser.add_argument("--peer-venv", default=common.PEER_VENV, help="where the peer's venv lives")
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
    parser.add_argument("--data-dir", default=str(common.SHARED_DATA),
                        help="--peer: directory holding wikitext-2-raw-v1/test.jsonl for the perplexity")


def _spp_command(tool: str, model_dir: Path, method: str, calibration: Path, weights_out: Path, result_file: Path,
                 args, forward_baseline: bool) -> tuple[list[str], Path, dict]:
    """(command, cwd, extra environment) of one spp child: this checkout's, or --baseline-checkout's."""
    worker = ["--worker", "--worker-model", str(model_dir), "--worker-method", method, "--worker-result",
              str(result_file), "--worker-calibration", str(calibration), "--worker-weights-out", str(weights_out),
              "--pattern", args.pattern, "--threads", str(args.threads)]
    if args.sparsity is not None:
        worker += ["--sparsity", str(args.sparsity)]
    if forward_baseline and tool == "spp":
        worker.append("--worker-forward-baseline")
    if args.sparsity_profile != "uniform":  # (a baseline checkout older than OWL knows no such option)
        worker += ["--sparsity-profile", args.sparsity_profile, "--owl-threshold", str(args.owl_threshold),
                   "--owl-lambda", str(args.owl_lambda)]
    checkout = common.REPO if tool == "spp" else Path(args.baseline_checkout).resolve()
    if (checkout / "benchmarks" / "prune.py").is_file():
        return [sys.executable, "-m", "benchmarks.prune", *worker], checkout, {"PYTHONPATH": str(checkout)}
    # a checkout from before benchmarks/ was a package: its script puts its own checkout on sys.path
    return [sys.executable, str(checkout / "scripts" / "bench_prune.py"), *worker], common.REPO, {}


def _peer_command(peer_python: Path, model_dir: Path, method: str, calibration: Path, weights_out: Path,
                  result_file: Path, args) -> list[str]:
    command = [str(peer_python), "-m", "benchmarks.peer_llmcompressor", "--model", str(model_dir),
               "--method", method, "--sparsity", str(args.pattern_spec.sparsity),
               "--mask-structure", args.mask_structure, "--calibration", str(calibration),
               "--threads", str(args.threads), "--weights-out", str(weights_out), "--result", str(result_file)]
    if args.sparsity_profile == "owl":
        command += ["--sparsity-profile", "owl", "--owl-m", str(int(args.owl_threshold)),
                    "--owl-lmbda", str(args.owl_lambda)]
    return command


def run_matched(tool: str, model_dir: Path, method: str, calibration: Path, weights_out: Path,
                peer_python: Path | None, args, log: Path, forward_baseline: bool = True) -> dict:
    """One child process of `tool` (spp, spp-baseline or llmcompressor); its JSON result plus the driver's own
    measurements. forward_baseline: spp's runs also time plain forward passes (after the result is measured)."""
    result_file = weights_out.with_suffix(".json")
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                   "OMP_WAIT_POLICY": args.omp_wait_policy, "TOKENIZERS_PARALLELISM": "false"}
    if tool == "llmcompressor":
        command, cwd = _peer_command(peer_python, model_dir, method, calibration, weights_out, result_file, args), \
            common.REPO
    else:
        command, cwd, extra = _spp_command(tool, model_dir, method, calibration, weights_out, result_file, args,
                                           forward_baseline)
        environment.update(extra)
    load_before = os.getloadavg()[0]
    with log.open("a") as handle:
        handle.write(f"\n===== {tool} {method} {model_dir.name}\n")
        handle.flush()
        spawned = time.time()
        completed = subprocess.run(command, cwd=cwd, env=environment, stdout=handle, stderr=subprocess.STDOUT)
        exited = time.time()
    if completed.returncode != 0:
        tail = log.read_text(errors="replace").rsplit("\n===== ", 1)[-1].strip().splitlines()[-5:]
        raise SystemExit(f"{tool} {method} on {model_dir.name} failed (exit {completed.returncode}): "
                         + "\n".join(tail))
    result = json.loads(result_file.read_text())
    result["process_seconds"] = round(result.pop("done") - spawned, 3)
    result["interpreter_start_seconds"] = round(result.pop("started") - spawned, 3)
    result["subprocess_seconds"] = round(exited - spawned, 3)  # includes teardown (and spp's forward baseline)
    result["loadavg_1min_before"] = round(load_before, 2)
    return result


def run_alternating(label: str, model_dir: Path, method: str, repeats: int, calibration: Path, scratch: Path,
                    peer_python: Path | None, args, log: Path) -> tuple[dict, dict, dict]:
    """spp, peer, spp, peer, ... `repeats` times each (spp alone when peer_python is None); returns (runs per tool,
    checks, first weights file per tool)."""
    tools = ["spp"] + (["llmcompressor"] if peer_python else []) + (["spp-baseline"] if args.baseline_checkout else [])
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
    }
    if "llmcompressor" in first:
        checks["spp_vs_peer"] = compare_weights(read_linears(first["spp"]), read_linears(first["llmcompressor"]))
    if "spp-baseline" in first:  # the same windows and options through an earlier spp: the masks must not move
        checks["spp_vs_baseline"] = {"identical_weights": hashes["spp"] == hashes["spp-baseline"],
                                     "baseline_checkout": str(args.baseline_checkout)}
        first.pop("spp-baseline")  # the perplexity of bit-identical weights would be the same
    return runs, checks, first


def prepare_models(args, scratch: Path) -> tuple[list[tuple], object]:
    """The --peer-models as (label, directory, repeats, evaluate, calibration file), and the tiny model's windows."""
    from safetensors.torch import save_file

    from spp_cli.data.sources import calibration_windows
    from spp_cli.io.checkpoint import load_model

    def windows_file(tokenizer, path: Path):
        ids = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)
        save_file({"input_ids": ids.contiguous()}, path)
        return ids, path

    tiny = scratch / "tiny-llama"  # a snapshot: the shipped directory may be replaced while this runs
    shutil.copytree(common.TINY_DIR, tiny)
    calibration_ids, calibration = windows_file(load_model(str(tiny))[1], scratch / "calibration.safetensors")
    models = []
    for spec in [name.strip() for name in args.peer_models.split(",") if name.strip()]:
        if spec == "tiny-llama":
            models.append(("tiny-llama", tiny, args.repeats, True, calibration))
        elif spec in RANDOM_SHAPES:
            import torch

            shape, dtype = RANDOM_SHAPES[spec]
            directory = common.save_random_llama(scratch / spec, shape, dtype and getattr(torch, dtype),
                                                 tokenizer_from=tiny)
            models.append((spec, directory, args.repeats_random, False, calibration))
        elif "=" in spec:  # a local model with its own tokenizer: its own windows from the same source
            label, directory = spec.split("=", 1)
            _, own = windows_file(load_model(directory)[1], scratch / f"calibration-{label}.safetensors")
            models.append((label, Path(directory), args.repeats_random, False, own))
        else:
            raise SystemExit(f"--peer-models: unknown model {spec!r}: use tiny-llama, {RANDOM_LLAMA}, "
                             f"{RANDOM_GQA} or LABEL=DIR")
    return models, calibration_ids


def measure_model(label: str, model_dir: Path, repeats: int, evaluate: bool, calibration: Path, calibration_ids,
                  methods: list[str], scratch: Path, peer_python: Path | None, args) -> tuple[list[dict], dict | None]:
    """Every method's alternating runs on one model, summarized; the peer's versions (None without the peer)."""
    log = scratch / "children.log"
    measured = {method: run_alternating(label, model_dir, method, repeats, calibration, scratch, peer_python, args,
                                        log) for method in methods}
    results = {f"{method}/{tool}": first for method in methods for tool, first in measured[method][2].items()}
    values = perplexities(model_dir, results, args.seqlen, args.data_dir,
                          SMOKE_PERPLEXITY_WINDOWS if args.smoke else None) if evaluate else None
    summaries = []
    for method, (runs, checks, _) in measured.items():
        perplexity = None if values is None else {
            task: {"seqlen": by_label["seqlen"], "windows": by_label["windows"], "dense": by_label["dense"],
                   **{tool: by_label[f"{method}/{tool}"] for tool in runs if f"{method}/{tool}" in by_label}}
            for task, by_label in values.items()
        }
        summaries.append(summarize(label, method, runs, checks, perplexity))
        if args.sparsity_profile == "owl":
            from benchmarks.prune_owl import owl_comparison

            summaries[-1]["owl"] = owl_comparison(runs, model_dir, calibration_ids, args.pattern_spec.sparsity,
                                                  args.owl_threshold, args.owl_lambda)
        print(json.dumps({key: summaries[-1][key] for key in ("model", "method", "median",
                          "ratio_spp_over_peer", "targets_met")}), flush=True)
    peer_versions = next((run["versions"] for runs, _, _ in measured.values()
                          for run in runs.get("llmcompressor", [])), None)
    return summaries, peer_versions


def run_peer_benchmark(args, methods: list[str]) -> dict:
    """Alternating spp / llm-compressor runs on every --peer-models model; the report as a dict."""
    if args.sparsity_profile == "owl" and args.owl_threshold != int(args.owl_threshold):
        raise SystemExit(f"--owl-threshold {args.owl_threshold} must be an integer: llm-compressor's owl_m is")
    # the driver evaluates perplexity itself: same threads and wait policy as the children, set before torch loads
    os.environ.update(OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY=args.omp_wait_policy)
    if args.calib is None:
        args.calib = str(DEFAULT_CALIB) if DEFAULT_CALIB.is_file() else "builtin:python-docs"
    import torch
    import transformers

    from pruners import parse_pattern

    torch.set_num_threads(args.threads)
    args.pattern_spec = parse_pattern(args.pattern, args.sparsity)
    args.mask_structure = (f"{args.pattern_spec.n}:{args.pattern_spec.m}" if args.pattern_spec.is_nm else "0:0")
    peer_python = common.find_peer_python(args.peer_python, args.peer_venv, args.smoke)
    load_at_start = os.getloadavg()
    report_models, summaries, peer_versions = {}, [], None
    with tempfile.TemporaryDirectory(prefix="bench-prune-peer-") as scratch_name:
        scratch = Path(scratch_name)
        models, calibration_ids = prepare_models(args, scratch)
        for label, model_dir, repeats, evaluate, calibration in models:
            weights_sha = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
            report_models[label] = {"directory": str(model_dir), "model_safetensors_sha256": weights_sha,
                                    "config": json.loads((model_dir / "config.json").read_text())}
            found, versions = measure_model(label, model_dir, repeats, evaluate, calibration, calibration_ids,
                                            methods, scratch, peer_python, args)
            summaries += found
            peer_versions = versions or peer_versions
    return {
        "benchmark": "spp prune vs llm-compressor oneshot (alternating child processes)",
        "config": peer_config(args, methods, models),
        "peer": None if peer_python else "skipped: llm-compressor's venv is not there (--smoke never makes one)",
        "models": report_models,
        "machine": common.machine_info(loadavg_at_start=[round(x, 2) for x in load_at_start]),
        "versions": {"spp_venv": {"torch": torch.__version__, "transformers": transformers.__version__},
                     "peer_venv": peer_versions},
        "results": summaries,
        "created": common.timestamp(),
    }


def peer_config(args, methods: list[str], models: list[tuple]) -> dict:
    """The report's "config": every option both tools ran with, and the two calls written out."""
    owl = args.sparsity_profile == "owl"
    return {
        "pattern": str(args.pattern_spec), "mask_structure": args.mask_structure,
        "sparsity": args.pattern_spec.sparsity, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "calibration": f"{args.calib} via spp_cli.data.sources.calibration_windows(tiny tokenizer, seed 0), "
                       "the same input_ids for both tools and both models",
        "sparsity_profile": args.sparsity_profile,
        **({"owl_threshold": args.owl_threshold, "owl_lambda": args.owl_lambda} if owl else {}),
        "methods": methods, "threads": args.threads, "omp_wait_policy": args.omp_wait_policy,
        "repeats": {label: repeats for label, _, repeats, _, _ in models},
        "baseline_checkout": args.baseline_checkout, "smoke": args.smoke,
        "peer_call": "oneshot(model, dataset=Dataset{input_ids}, recipe=<Modifier>(sparsity, "
                     f"mask_structure={args.mask_structure!r}, targets=[decoder-block class], "
                     "ignore=['re:.*lm_head']" + (
                         f", sparsity_profile='owl', owl_m={int(args.owl_threshold)}, owl_lmbda={args.owl_lambda}; "
                         "two 0.14.0.1 OWL bugs patched around: benchmarks.peer_llmcompressor.work_around_owl_bugs"
                         if owl else "") + "), "
                     "num_calibration_samples=nsamples, max_seq_length=seqlen, "
                     "shuffle_calibration_samples=False, batch_size=1, pipeline='sequential')",
        "spp_call": "prune_model(model, input_ids, PruneOptions(method, pattern" + (
            ", sparsity_profile='owl', owl_threshold, owl_lambda" if owl else "")
        + ")) (defaults: batch_size 1, device cpu)",
    }

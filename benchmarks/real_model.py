"""Benchmark on a real pretrained model (Gemma 3 270M): spp's pruning against llm-compressor's, then SPP recovery.

A benchmark, not a CI test. One run does, on one machine, with every size an option (recorded in the JSON):
  1. build the model into a cache folder outside the repository if it is missing (../shared/models/gemma3-270m.sh);
  2. draw --nsamples x --seqlen calibration windows ONCE from the shared C4 slice with
     spp_cli.data.sources.calibration_windows (seed 0) and hand the same input_ids to both tools;
  3. prune with spp (magnitude, Wanda, SparseGPT) and llm-compressor (Wanda, SparseGPT; its magnitude modifier is a
     schedule, not one-shot) at 50% unstructured and 2:4, each run a fresh child process, spp and llm-compressor
     alternating (benchmarks/prune_peer.py's machinery: its venv, its workers, its checks);
  4. evaluate the dense model and every pruned result in this venv: WikiText-2 token perplexity @seqlen on the
     first --eval-windows windows of the test stream (spp_cli.eval.perplexity) and the 8 offline zero-shot tasks
     with --limit examples each (spp_cli.eval.engine.evaluate, data from --data-dir);
  5. recover spp's Wanda 2:4 model with `spp finetune` by every --recovery-methods (default: SPP, LoRA,
     masked-lora, IA3, masked-full) at the same steps, batch, sequence length and data (the local Alpaca subset),
     each at its own default learning rate unless --lr is given; check each against the parent with `spp
     verify`'s function (zeros kept; LoRA is dense by design), record its s/step and memory (adapter/run.json),
     and evaluate each;
  6. a same-layer, same-input check: block 0's linears see the same (dense) input in both tools, so their masks and
     weights are compared with the reference algorithms (spec/pruners.md; tests/pruners' transcription) on the
     very calibration inputs (benchmarks/real_layer_check.py).

  OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python -m benchmarks.real_model --out benchmarks/results/real_model.json
  ... --smoke   (the shipped tiny model instead, Wanda 2:4 and SPP only, one window, one example, one step;
                llm-compressor only where its venv exists already)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.prune import PEER_METHODS
from benchmarks.prune_compare import check_sparsity, compare_weights, read_linears
from benchmarks.prune_peer import run_matched
from benchmarks.real_model_report import METHODS, PATTERNS, markdown_table, targets

SHARED = common.SHARED
BUILD_SCRIPT = SHARED / "models" / "gemma3-270m.sh"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
DEFAULT_MODEL_DIR = CACHE / "spp-real-models" / "gemma3-270m-hf"  # outside the repository
C4_FILE = "c4/c4-train.00000-of-01024.first1000.jsonl"
ALPACA_FILE = "alpaca/alpaca_small.json"
ZEROSHOT_ROWS = ("all", "spp", "recovery", "none")
SIZE_OPTIONS = ("nsamples", "seqlen", "eval_windows", "limit", "zeroshot_rows", "eval_batch_size", "eval_dtype",
                "steps", "batch_size", "micro_batch_size", "train_seqlen", "lr", "recovery_methods", "threads")
RECOVERY_METHODS = ("spp", "lora", "masked-lora", "ia3", "masked-full")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR),
                        help="built there by the shared script if missing")
    parser.add_argument("--data-dir", default=str(common.SHARED_DATA))
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows (the issue's 64)")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration and perplexity window length")
    parser.add_argument("--eval-windows", type=int, default=16, help="WikiText-2 test windows scored (the first N)")
    parser.add_argument("--limit", type=int, default=50, help="examples per zero-shot task (the first N)")
    parser.add_argument("--zeroshot-rows", choices=ZEROSHOT_ROWS, default="all",
                        help="which rows also get the zero-shot tasks (all; spp: not the llm-compressor rows; "
                             "recovery: dense, spp's Wanda 2:4 and the two recovered models; none: no row, not even "
                             "dense and the recovered models); the rest get ppl only")
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--eval-dtype", default="float32", help="dtype the evaluation model computes in")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of every recovery (the same budget)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--train-seqlen", type=int, default=256, help="longest training example, in tokens")
    parser.add_argument("--lr", type=float, default=None,
                        help="every recovery method's learning rate (default: each method's own, spp finetune's)")
    parser.add_argument("--recovery-methods", default=",".join(RECOVERY_METHODS),
                        help=f"a subset of {','.join(RECOVERY_METHODS)}")
    parser.add_argument("--patterns", default=",".join(PATTERNS), help="a subset of unstructured,2:4 (both at 50%%)")
    parser.add_argument("--methods", default=",".join(METHODS), help="a subset of magnitude,wanda,sparsegpt")
    parser.add_argument("--skip-peer", action="store_true", help="spp only (no llm-compressor rows)")
    parser.add_argument("--skip-recovery", action="store_true")
    parser.add_argument("--peer-venv", default=".bench-venvs/llmcompressor")
    parser.add_argument("--peer-python", default=None, help="an interpreter with llmcompressor 0.14 (no venv made)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2))
    parser.add_argument("--omp-wait-policy", default="PASSIVE", help="as in benchmarks.prune --peer")
    parser.add_argument("--work-dir", default=None, help="scratch for weights and checkpoints (default: a temp dir)")
    parser.add_argument("--out", default=None, help="default benchmarks/results/real_model.json")
    parser.add_argument("--smoke", action="store_true", help="seconds, on the shipped tiny model (see above)")
    parser.add_argument("--table", metavar="JSON", help="print the markdown table of a finished report and exit")
    return parser


def ensure_model(model_dir: Path) -> dict:
    """Build the checkpoint with the shared script unless it is there; how long that took (0 when it existed)."""
    if (model_dir / "model.safetensors").is_file():
        return {"built": False, "seconds": 0.0}
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subprocess.run(["bash", str(BUILD_SCRIPT), str(model_dir), sys.executable], check=True)
    return {"built": True, "seconds": round(time.perf_counter() - start, 1)}


def pattern_args(pattern: str, args) -> argparse.Namespace:
    """The fields prune_peer.run_matched and check_sparsity read, for one pattern at 50%."""
    from pruners import parse_pattern

    spec = parse_pattern(pattern, 0.5 if pattern == "unstructured" else None)
    return argparse.Namespace(pattern=pattern, sparsity=0.5 if pattern == "unstructured" else None,
                              pattern_spec=spec, mask_structure=f"{spec.n}:{spec.m}" if spec.is_nm else "0:0",
                              threads=args.threads, omp_wait_policy=args.omp_wait_policy,
                              sparsity_profile="uniform", baseline_checkout=None)


def prune_all(model_dir: Path, calibration: Path, scratch: Path, peer_python: Path | None, args) -> list[dict]:
    """Every (pattern, method, tool) run; each row keeps its weights file for the evaluation."""
    rows, log = [], scratch / "children.log"
    for pattern in args.patterns.split(","):
        run_args = pattern_args(pattern, args)
        for method in args.methods.split(","):
            tools = ["spp"] + (["llmcompressor"] if peer_python and method in PEER_METHODS else [])
            by_tool = {}
            for tool in tools:
                weights = scratch / f"{method}-{pattern.replace(':', 'of')}-{tool}.safetensors"
                run = run_matched(tool, model_dir, method, calibration, weights, peer_python, run_args,
                                              log, forward_baseline=False)
                run["sparsity"] = check_sparsity(read_linears(weights), run_args.pattern_spec)
                if tool == "llmcompressor":
                    run["solve_seconds"] = peer_compress_seconds(log)
                by_tool[tool] = weights
                rows.append({"label": f"{method} {pattern}", "method": method, "pattern": pattern, "tool": tool,
                             "weights": str(weights), "prune": run})
                print(f"{method} {pattern} {tool}: process {run['process_seconds']} s", flush=True)
            if len(by_tool) == 2:
                rows[-1]["spp_vs_peer"] = compare_weights(
                    read_linears(by_tool["spp"]), read_linears(by_tool["llmcompressor"]))
    return rows


def peer_compress_seconds(log: Path) -> float:
    """The sum of llm-compressor's own per-module "compress | METRIC - time Xs" (Wanda) or "SGPT | METRIC - time Xs"
    (SparseGPT) lines in the last child's log: its solve time without the calibration forwards, the counterpart of
    spp's solve_seconds."""
    last_child = log.read_text(errors="replace").rsplit("\n===== ", 1)[-1]
    times = re.findall(r"\| (?:compress|SGPT) \| METRIC - time ([0-9.]+)s", last_child)
    return round(sum(float(x) for x in times), 3)


class Evaluator:
    """The dense model, loaded once in --eval-dtype; each row's decoder linears are swapped in before scoring."""

    def __init__(self, model_dir: Path, args) -> None:
        from spp_cli.eval.perplexity import perplexity_stream
        from spp_cli.io.checkpoint import load_model

        self.args = args
        self.model, self.tokenizer = load_model(str(model_dir), dtype=args.eval_dtype)
        self.stream, self.source = perplexity_stream("wikitext2", self.tokenizer, args.seqlen, args.data_dir)
        self.dense_linears = {f"{name}.weight": linear.weight.detach().clone()
                              for name, linear in decoder_linears(self.model).items()}

    def evaluate(self, weights: dict | None, zeroshot: bool = True) -> dict:
        """{"wikitext2_ppl", "mean_acc_8", "mean_acc_7", "acc": {task: acc}, "seconds"} of the dense model with
        `weights` (decoder-linear name.weight -> tensor; None: dense) swapped in; without `zeroshot` the
        accuracies are None (perplexity only)."""
        from spp_cli.eval.engine import evaluate
        from spp_cli.eval.perplexity import token_perplexity
        from spp_cli.eval.zeroshot import BUNDLE_TASKS

        start = time.perf_counter()
        replacement = self.dense_linears if weights is None else weights
        if set(replacement) != set(self.dense_linears):
            differing = sorted(set(self.dense_linears) ^ set(replacement))
            raise SystemExit(f"the weights do not cover the decoder linears: {differing[:3]}")
        self.model.load_state_dict(replacement, strict=False)
        ppl = token_perplexity(self.model, self.stream, self.args.seqlen, self.args.eval_batch_size,
                               max_windows=self.args.eval_windows)
        result = {"wikitext2_ppl": round(ppl["value"], 4), "ppl_windows": ppl["windows"], "mean_acc_8": None,
                  "mean_acc_7": None, "acc": None}
        if zeroshot:
            scores = evaluate(self.model, self.tokenizer, list(BUNDLE_TASKS), limit=self.args.limit,
                              data_dir=self.args.data_dir, batch_size=self.args.eval_batch_size)
            acc = {task: round(scores["results"][task]["acc,none"], 4) for task in BUNDLE_TASKS}
            result.update(acc=acc, mean_acc_8=round(sum(acc.values()) / len(acc), 4),
                          mean_acc_7=round(scores["mean_acc_7"], 4))
        return {**result, "seconds": round(time.perf_counter() - start, 1)}


def decoder_linears(model) -> dict:
    from pruners.sequential import prunable_linears

    return prunable_linears(model)


def read_decoder_linears(directory: Path, names: set[str]) -> dict:
    """The tensors `names` from every safetensors shard of a checkpoint directory."""
    from safetensors.torch import load_file

    found = {}
    for shard in sorted(directory.glob("*.safetensors")):
        found |= {key: value for key, value in load_file(shard).items() if key in names}
    return found


def save_pruned_parent(model_dir: Path, weights_file: Path, out: Path, calibration_note: str) -> Path:
    """spp's Wanda 2:4 result as a checkpoint with spp.json (what `spp prune` writes), for `spp finetune`."""
    from safetensors.torch import load_file

    from spp_cli.io import checkpoint
    from spp_cli.io.manifest import layers_record, stage_manifest

    model, tokenizer = checkpoint.load_model(str(model_dir))
    weights = load_file(weights_file)
    model.load_state_dict(weights, strict=False)
    names = [key.removesuffix(".weight") for key in weights]
    manifest = stage_manifest("prune", parent=checkpoint.parent_record(str(model_dir), None), method="wanda",
                              pattern="2:4", target_sparsity=0.5, dense=False, layers=layers_record(model, names),
                              config={"method": "wanda", "pattern": "2:4", "calib": calibration_note},
                              fingerprint="bench_real_model")
    checkpoint.save_checkpoint(model, tokenizer, out, manifest, parent_dir=model_dir)
    return out


def recover(parent: Path, scratch: Path, method: str, args) -> dict:
    """`method` on the pruned parent at the shared budget; the merged result verified against the parent, with its
    s/step and memory from adapter/run.json."""
    from spp_cli.adapters import method_named
    from spp_cli.stages.finetune import finetune
    from spp_cli.stages.verify import verify_checkpoint

    lr = args.lr if args.lr is not None else method_named(method).default_lr
    out = scratch / f"recovered-{method}"
    start = time.perf_counter()
    manifest = finetune(str(parent), out, data=str(Path(args.data_dir) / ALPACA_FILE), method=method,
                        max_steps=args.steps, lr=lr, batch_size=args.batch_size,
                        micro_batch_size=args.micro_batch_size, seqlen=args.train_seqlen, val_size=0, device="cpu")
    seconds = time.perf_counter() - start
    report = verify_checkpoint(out, against=parent)
    run = json.loads((out / "adapter" / "run.json").read_text())
    print(f"recovery {method}: {seconds:.0f} s, verify ok={report['ok']} lost_zeros={report['lost_zeros']}",
          flush=True)
    return {
        "directory": str(out), "lr": lr, "finetune_seconds": round(seconds, 1),
        "trainable_params": manifest["training"]["trainable_params"],
        "seconds_per_step": run.get("seconds_per_step"), "peak_memory_mb": run.get("peak_memory_mb"),
        "memory_measure": run.get("memory_measure"), "loss_curve": manifest["training"]["loss_curve"],
        "verify": {key: report[key] for key in ("ok", "dense", "pattern", "layers_checked", "lost_zeros",
                                                 "extra_zeros", "broken_groups")},
    }


SMOKE = {"nsamples": 2, "seqlen": 32, "eval_windows": 1, "limit": 1, "zeroshot_rows": "none", "steps": 1,
         "batch_size": 1, "micro_batch_size": 1, "train_seqlen": 32, "recovery_methods": "spp", "methods": "wanda",
         "patterns": "2:4"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, checked; --smoke's sizes applied (and the shipped tiny model as the model)."""
    args = build_parser().parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE, model_dir=str(common.TINY_DIR))
    unknown = set(args.patterns.split(",")) - set(PATTERNS) | set(args.methods.split(",")) - set(METHODS)
    unknown |= set(args.recovery_methods.split(",")) - set(RECOVERY_METHODS)
    if unknown:
        raise SystemExit(f"unknown pattern or method {sorted(unknown)}: use {PATTERNS}, {METHODS} and "
                         f"{RECOVERY_METHODS}")
    if not args.skip_recovery and ("2:4" not in args.patterns.split(",") or "wanda" not in args.methods.split(",")):
        raise SystemExit("the recovery starts from spp's Wanda 2:4 model: include 2:4 and wanda, "
                         "or pass --skip-recovery")
    args.out = args.out or common.default_out("real_model", args.smoke)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return
    os.environ.update(OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY=args.omp_wait_policy,
                      TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    import torch

    torch.set_num_threads(args.threads)
    started, load_at_start = time.time(), os.getloadavg()
    model_dir = Path(args.model_dir)
    build = ensure_model(model_dir)
    peer_python = None if args.skip_peer else common.find_peer_python(args.peer_python, args.peer_venv, args.smoke)
    report = {
        "benchmark": "real pretrained model: spp vs llm-compressor pruning, every recovery method",
        "model": {"directory": str(model_dir), "build": build,
                  "config": json.loads((model_dir / "config.json").read_text())},
        "sizes": {key: getattr(args, key) for key in SIZE_OPTIONS}, "smoke": args.smoke,
        "peer": "llmcompressor" if peer_python else "skipped",
        "rows": [], "recovery": None, "layer_check": None,
    }
    with tempfile.TemporaryDirectory(prefix="bench-real-", dir=args.work_dir) as scratch_name:
        run_all(model_dir, Path(scratch_name), peer_python, args, report)
    for row in report["rows"]:
        row.pop("weights", None)
    report["targets"] = targets(report)
    report["machine"] = common.machine_info(loadavg_at_start=[round(x, 2) for x in load_at_start])
    report["wall_seconds"] = round(time.time() - started, 1)
    write(report, args.out)


def run_all(model_dir: Path, scratch: Path, peer_python: Path | None, args, report: dict) -> None:
    """Calibrate, prune every row, evaluate it, check block 0 against the references, recover; `report` filled
    in and written as each part finishes."""
    from safetensors.torch import load_file, save_file

    from benchmarks.real_layer_check import block0_check
    from spp_cli.data.sources import calibration_windows
    from spp_cli.io.checkpoint import load_model

    _, tokenizer = load_model(str(model_dir))
    c4 = str(Path(args.data_dir) / C4_FILE)
    calibration_ids = calibration_windows(tokenizer, c4, args.nsamples, args.seqlen, seed=0)
    calibration = scratch / "calibration.safetensors"
    save_file({"input_ids": calibration_ids.contiguous()}, calibration)
    report["calibration"] = {"source": c4, "shape": list(calibration_ids.shape), "seed": 0,
                             "drawn_by": "spp_cli.data.sources.calibration_windows, once, for both tools"}

    rows = prune_all(model_dir, calibration, scratch, peer_python, args)
    evaluator = Evaluator(model_dir, args)
    zeroshot_dense = args.zeroshot_rows != "none"
    report["rows"].append({"label": "dense", "tool": None, "eval": evaluator.evaluate(None, zeroshot_dense)})
    write(report, args.out)
    for row in rows:
        zeroshot = {"all": True, "spp": row["tool"] == "spp", "none": False,
                    "recovery": (row["method"], row["pattern"], row["tool"]) == ("wanda", "2:4", "spp")}
        row["eval"] = evaluator.evaluate(load_file(row["weights"]), zeroshot[args.zeroshot_rows])
        report["rows"].append(row)
        print(f"{row['label']} {row['tool']}: ppl {row['eval']['wikitext2_ppl']} mean acc "
              f"{row['eval']['mean_acc_8']}", flush=True)
        write(report, args.out)

    report["layer_check"] = block0_check(
        model_dir, calibration_ids, {(row["method"], row["pattern"], row["tool"]): Path(row["weights"])
                                     for row in rows if row["method"] != "magnitude"})
    write(report, args.out)
    if not args.skip_recovery:
        recover_all(model_dir, rows, evaluator, scratch, c4, args, report)


def recover_all(model_dir: Path, rows: list[dict], evaluator: Evaluator, scratch: Path, c4: str, args,
                report: dict) -> None:
    """Every --recovery-methods on spp's Wanda 2:4 model, each scored and written as it finishes."""
    spp_wanda = next(row for row in rows if (row["method"], row["pattern"], row["tool"]) == ("wanda", "2:4", "spp"))
    parent = save_pruned_parent(model_dir, Path(spp_wanda["weights"]), scratch / "wanda-2of4-spp",
                                f"{c4} ({args.nsamples} x {args.seqlen}, seed 0)")
    report["recovery"] = {}
    dense, pruned = report["rows"][0]["eval"]["wikitext2_ppl"], spp_wanda["eval"]["wikitext2_ppl"]
    for method in args.recovery_methods.split(","):
        result = report["recovery"][method] = recover(parent, scratch, method, args)
        weights = read_decoder_linears(Path(result["directory"]), set(evaluator.dense_linears))
        result["eval"] = evaluator.evaluate(weights, args.zeroshot_rows != "none")
        result["gap_recovered"] = round((pruned - result["eval"]["wikitext2_ppl"]) / (pruned - dense), 4)
        write(report, args.out)


def write(report: dict, out: str) -> None:
    common.write_json(report, out, announce=False)


if __name__ == "__main__":
    main()

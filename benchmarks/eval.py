"""Benchmark `spp eval` against the `lm_eval` CLI on the same model and the same offline task files.

Times, in one run:
  1. spp in-process: wikitext2 token perplexity (paper protocol) and the 8-task offline bundle with --limit;
  2. spp whole process: `python -m spp_cli eval MODEL --tasks <8 tasks> --data-dir ... --limit N`;
  3. lm-eval whole process: `python -m lm_eval --model hf --model_args pretrained=MODEL,dtype=... --tasks <8 tasks>
     --include_path <the same bundle YAMLs> --limit N --num_fewshot 0`, whose accuracies must equal spp's
     (same YAMLs, same model, same batch size).
  4. spp in-process again with each other `--bos` rule (default: no, the Wanda/SPP harness's
     add_special_tokens=False), and the accuracy difference per task against the default rule (auto).
wikitext2 token perplexity has no lm-eval counterpart (its `wikitext` task is word perplexity per document,
spec/ecosystem.md §3), so it is timed on the spp side only.

    .venv/bin/python -m benchmarks.eval [--model DIR|builtin:tiny-llama] [--limit 200] [--out FILE.json]

--smoke: the tiny model, 2 examples per task, the perplexity on the first 40 rows of WikiText-2 test in 128-token
windows, no other BOS rule and no whole-process runs (--skip-cli).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

REPO = common.REPO
DEFAULT_DATA = common.SHARED_DATA
TINY_LLAMA = common.TINY_DIR
SMOKE_ROWS = 40  # --smoke: WikiText-2 test rows scored


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-llama" if (TINY_LLAMA / "config.json").is_file() else None,
                        help="model directory or builtin:NAME (default builtin:tiny-llama when shipped)")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA), help="directory laid out like shared/data")
    parser.add_argument("--limit", type=int, default=200, help="examples per zero-shot task")
    parser.add_argument("--seqlen", type=int, default=None, help="perplexity window (default min(2048, positions))")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward, for both tools")
    parser.add_argument("--dtype", default="float32", help="model dtype for both tools")
    parser.add_argument("--bos-rules", default="no", help="other zero-shot BOS rules to compare with auto (comma list)")
    parser.add_argument("--skip-cli", action="store_true", help="only the in-process spp timings")
    parser.add_argument("--out", default=None, help="default benchmarks/results/eval.json")
    parser.add_argument("--smoke", action="store_true", help="seconds: 2 examples per task, 128-token windows, "
                        "in-process only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.limit, args.seqlen, args.skip_cli, args.bos_rules = 2, args.seqlen or 128, True, ""
    if args.model is None:
        parser.error("--model is required until spp_cli/assets/tiny-llama is shipped")
    return args


def run_process(command: list[str], env: dict) -> dict:
    """Run a whole process; its wall seconds, exit code and the tail of its stderr when it failed."""
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    record = {"seconds": round(time.perf_counter() - started, 3), "rc": completed.returncode,
              "command": " ".join(command)}
    if completed.returncode != 0:
        record["stderr_tail"] = completed.stderr[-2000:]
    return record


def accuracies(results: dict) -> dict[str, float]:
    return {task: metrics["acc,none"] for task, metrics in results.items() if "acc,none" in metrics}


def time_spp_in_process(model_path: str, tasks: list[str], args, report: dict) -> None:
    """spp's own numbers, in this process: model load, wikitext2 token perplexity, the bundle, each other BOS rule."""
    from spp_cli.eval.engine import evaluate
    from spp_cli.io.checkpoint import load_model

    started = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    report["model_load_seconds"] = round(time.perf_counter() - started, 3)
    report["parameters"] = sum(p.numel() for p in model.parameters())

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        task = "wikitext2"
        if args.smoke:  # the same protocol through the same call, on the first rows only
            rows = Path(args.data_dir, "wikitext-2-raw-v1", "test.jsonl").read_text().splitlines()[:SMOKE_ROWS]
            (Path(tmp) / "head.jsonl").write_text("\n".join(rows) + "\n")
            task = f"ppl:{Path(tmp) / 'head.jsonl'}"
        ppl = evaluate(model, tokenizer, [task], seqlen=args.seqlen, data_dir=args.data_dir,
                       batch_size=args.batch_size)["perplexity"][task]
    report["spp_wikitext2_token_ppl"] = {"seconds": round(time.perf_counter() - started, 3), **ppl}

    started = time.perf_counter()
    bundle = evaluate(model, tokenizer, tasks, limit=args.limit, data_dir=args.data_dir, batch_size=args.batch_size)
    report["spp_bundle_in_process"] = {"seconds": round(time.perf_counter() - started, 3),
                                       "acc": accuracies(bundle["results"]), "n-samples": bundle["n-samples"],
                                       "mean_acc_7": bundle["mean_acc_7"], "bos": bundle["bos"]}
    for rule in [rule for rule in args.bos_rules.split(",") if rule and rule != "auto"]:
        started = time.perf_counter()
        other = evaluate(model, tokenizer, tasks, limit=args.limit, data_dir=args.data_dir,
                         batch_size=args.batch_size, bos=rule)
        auto_acc, other_acc = report["spp_bundle_in_process"]["acc"], accuracies(other["results"])
        report[f"spp_bundle_bos_{rule}"] = {
            "seconds": round(time.perf_counter() - started, 3), "acc": other_acc, "mean_acc_7": other["mean_acc_7"],
            "bos": other["bos"], "acc_minus_auto": {task: other_acc[task] - auto_acc[task] for task in tasks},
            "mean_acc_7_minus_auto": other["mean_acc_7"] - bundle["mean_acc_7"],
        }


def time_whole_processes(model_path: str, tasks: list[str], args, env: dict, report: dict) -> None:
    """`python -m spp_cli eval` and `python -m lm_eval` on the same model and task files; their accuracies."""
    from spp_cli.eval.zeroshot import render_bundle

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        spp_out = Path(tmp) / "spp.json"
        report["spp_cli"] = run_process(
            [sys.executable, "-m", "spp_cli", "eval", model_path, "--tasks", ",".join(tasks),
             "--data-dir", args.data_dir, "--limit", str(args.limit), "--batch-size", str(args.batch_size),
             "--device", "cpu", "--dtype", args.dtype, "--out", str(spp_out), "--format", "json"], env)
        if spp_out.is_file():
            (entry,) = json.loads(spp_out.read_text())["models"].values()  # results.json: one model
            report["spp_cli"]["acc"] = accuracies(entry["results"])

        include = Path(tmp) / "tasks"
        include.mkdir()
        render_bundle(tasks, args.data_dir, include)
        lm_out = Path(tmp) / "lm_eval"
        report["lm_eval_cli"] = run_process(
            [sys.executable, "-m", "lm_eval", "--model", "hf",
             "--model_args", f"pretrained={model_path},dtype={args.dtype}", "--tasks", ",".join(tasks),
             "--include_path", str(include), "--limit", str(args.limit), "--num_fewshot", "0",
             "--batch_size", str(args.batch_size), "--device", "cpu", "--output_path", str(lm_out)], env)
        result_files = sorted(lm_out.rglob("results_*.json"))
        if result_files:
            report["lm_eval_cli"]["acc"] = accuracies(json.loads(result_files[-1].read_text())["results"])

    spp_acc, lm_acc = report["spp_bundle_in_process"]["acc"], report["lm_eval_cli"].get("acc", {})
    if lm_acc:
        report["max_abs_acc_difference_vs_lm_eval"] = max(abs(spp_acc[t] - lm_acc[t]) for t in tasks)
    if report["spp_cli"]["rc"] == 0 and report["lm_eval_cli"]["rc"] == 0:
        report["whole_process_ratio_spp_over_lm_eval"] = round(
            report["spp_cli"]["seconds"] / report["lm_eval_cli"]["seconds"], 3)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import lm_eval
    import torch
    import transformers

    from spp_cli.eval.zeroshot import BUNDLE_TASKS
    from spp_cli.io.checkpoint import resolve_model_path

    model_path = str(Path(resolve_model_path(args.model)).resolve())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update({key: env[key] for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")})
    tasks = list(BUNDLE_TASKS)
    report = {
        "model": model_path, "data_dir": args.data_dir, "limit": args.limit, "batch_size": args.batch_size,
        "dtype": args.dtype, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "smoke": args.smoke,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "lm_eval": lm_eval.__version__},
    }
    time_spp_in_process(model_path, tasks, args, report)
    if not args.skip_cli:
        time_whole_processes(model_path, tasks, args, env, report)
    report["not_comparable"] = {"wikitext2": "lm-eval has no token-perplexity protocol; its `wikitext` task is "
                                             "word perplexity per document (spec/ecosystem.md §3)"}
    common.write_json(report, args.out or common.default_out("eval", args.smoke), announce=False)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""The recovery study (issue 24): which recovery buys the most per training token?

recipes/recovery-study.yaml is the study on the shipped tiny model, every row. This module runs those rows on
another model with the sizes a profile sets (the `gemma` profile: Gemma 3 270M built by
../shared/models/gemma3-270m.sh, C4 calibration, Alpaca training, WikiText-2 ppl), then gathers each row's figures
(stage seconds, the recovery curve, the eval's ppl and accuracies) from the stages' spp.json and the eval's
results.json into one JSON:

  nice .venv/bin/python -m benchmarks.recovery_study --profile tiny --out benchmarks/results/recovery_study_tiny.json
  nice .venv/bin/python -m benchmarks.recovery_study --profile gemma --model ~/models/gemma3-270m \
      --out benchmarks/results/recovery_study_gemma.json
  ... --smoke   (the tiny profile's recipe written and checked by `spp run --dry-run`; nothing trains)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks import common

RECIPE = common.REPO / "recipes" / "recovery-study.yaml"
GEMMA_ROWS = ("w24", "w24-rc", "w24-spp-sft", "w24-spp-distill", "w24-mlora-sft", "w24-mlora-distill")


def gemma_profile(recipe: dict, model: str, data: Path, rows: tuple[str, ...], steps: int = 12,
                  windows: int = 40) -> dict:
    """The study's rows on a real model at what 2 CPU cores run in under an hour: C4 calibration (64 x 512),
    reconstruction for 2 epochs, `steps` fine-tune steps x 4 Alpaca examples x 256 tokens with the held-out loss at
    4 points, WikiText-2 token ppl @512 on `windows` windows (no zero-shot tasks: see the README for their cost)."""
    stages = []
    for stage in recipe["stages"]:
        if stage["type"] == "prune" and stage["name"] in rows:
            stage = {**stage, "calib": str(data / "c4" / "c4-train.00000-of-01024.first1000.jsonl"), "seqlen": 512}
            if stage.get("refine") == "reconstruct":
                stage["reconstruct_epochs"] = 2
        elif stage["type"] == "finetune" and stage["name"] in rows:
            stage = {key: value for key, value in stage.items() if not key.startswith("eval_ppl")}
            stage |= {"data": str(data / "alpaca" / "alpaca_small.json"), "batch_size": 4,
                      "micro_batch_size": 2, "seqlen": 256, "val_size": 16,
                      "eval_steps": max(1, steps // 3), "max_steps": steps}
        elif stage["type"] == "eval":
            stage = {**stage, "models": ["dense", *[m for m in stage["models"] if m in rows]],
                     "tasks": ["wikitext2"], "seqlen": 512, "limit": windows, "batch_size": 4,
                     "data_dir": str(data)}
        else:
            continue
        stages.append(stage)
    return {**recipe, "model": model, "stages": stages}


def study_recipe(profile: str, model: str | None, data: Path, output_dir: Path, rows: tuple[str, ...],
                 steps: int = 12, windows: int = 40) -> dict:
    recipe = {key: value for key, value in yaml.safe_load(RECIPE.read_text()).items() if not key.startswith("x-")}
    if profile == "gemma":
        recipe = gemma_profile(recipe, model or str(common.REPO.parent / "models" / "gemma3-270m"), data, rows,
                               steps, windows)
    else:
        recipe["stages"][-1]["data_dir"] = str(data)
    return {**recipe, "output_dir": str(output_dir)}


def run_study(recipe_path: Path, dry_run: bool) -> float:
    """`spp run` on the study's recipe in a child process (its output streamed through); its seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spp_cli", "run", str(recipe_path), *(["--dry-run"] if dry_run else [])],
                   check=True, env=env, cwd=common.REPO)
    return round(time.perf_counter() - start, 1)


def row_record(stage: dict, output_dir: Path, results: dict) -> dict:
    """One row: what the stage did and cost (its spp.json) and how its model scored (the eval's results.json)."""
    manifest = json.loads((output_dir / stage["name"] / "spp.json").read_text())
    training = manifest.get("training", {})
    row = {"row": stage["name"], "stage": stage["type"], "input": stage.get("input"),
           "method": stage.get("method"), "refine": stage.get("refine"), "objective": stage.get("objective", "sft"),
           "seconds": manifest.get("seconds"), "sparsity": manifest.get("overall_sparsity")}
    if training:
        row |= {"steps": training.get("steps"), "curve": training.get("curve"),
                "train_tokens": (training.get("curve") or [{}])[-1].get("train_tokens")}
    scored = results["models"].get(stage["name"], {})
    row["ppl"] = {task: entry["value"] for task, entry in scored.get("perplexity", {}).items()}
    row["acc"] = {task: metrics.get("acc,none") for task, metrics in scored.get("results", {}).items()}
    return row


def collect(recipe: dict, output_dir: Path) -> list[dict]:
    results = json.loads((output_dir / "eval" / "results.json").read_text())
    dense = results["models"].get("dense", {})
    rows = [{"row": "dense", "ppl": {t: e["value"] for t, e in dense.get("perplexity", {}).items()},
             "acc": {t: m.get("acc,none") for t, m in dense.get("results", {}).items()}}]
    return rows + [row_record(stage, output_dir, results) for stage in recipe["stages"] if stage["type"] != "eval"]


def markdown_table(report: dict) -> str:
    """README's table: a row per model, its ppl, mean zero-shot accuracy, held-out loss along the budget, seconds."""
    lines = ["| row | from | recovery | held-out loss at each curve point | ppl | mean acc | seconds |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        ppl = next(iter(row["ppl"].values()), None)
        accs = [value for value in row.get("acc", {}).values() if value is not None]
        curve = " → ".join(f"{point['held_out_loss']:.3f}" for point in row.get("curve") or [])
        recovery = (f"{row['method']} {row['objective']}" if row.get("stage") == "finetune"
                    else row.get("refine") or ("" if row["row"] == "dense" else "none"))
        lines.append(f"| {row['row']} | {row.get('input') or ''} | {recovery} | {curve} | "
                     f"{'' if ppl is None else f'{ppl:.2f}'} | "
                     f"{f'{sum(accs) / len(accs):.3f}' if accs else ''} | {row.get('seconds') or ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=("tiny", "gemma"), default="tiny")
    parser.add_argument("--model", help="gemma: the built model folder (../shared/models/gemma3-270m.sh)")
    parser.add_argument("--rows", default=",".join(GEMMA_ROWS), help="gemma: the stages to run")
    parser.add_argument("--steps", type=int, default=12, help="gemma: fine-tune steps (4 examples x 256 tokens each)")
    parser.add_argument("--eval-windows", type=int, default=40, help="gemma: WikiText-2 windows of 512 tokens")
    parser.add_argument("--data-dir", default=str(common.SHARED_DATA))
    parser.add_argument("--work", default=None, help="the run's output folder (default: a folder under runs/)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--table", help="print README's table from this JSON and stop")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return 0
    work = Path(args.work or common.REPO / "runs" / f"recovery-study-{args.profile}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    recipe = study_recipe(args.profile, args.model, Path(args.data_dir).resolve(), work / "run",
                          tuple(args.rows.split(",")), args.steps, args.eval_windows)
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    seconds = run_study(recipe_path, dry_run=args.smoke)
    report = {"benchmark": "recovery study: which recovery buys the most per training token",
              "profile": args.profile, "recipe": recipe, "seconds": seconds,
              "machine": common.machine_info(loadavg_after=os.getloadavg()[0]),
              "rows": [] if args.smoke else collect(recipe, work / "run")}
    common.write_json(report, args.out or common.default_out(f"recovery_study_{args.profile}", args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())

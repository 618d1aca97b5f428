"""The recovery study (issue 24): which recovery buys the most per training token?

recipes/recovery-study.yaml is the study on the shipped tiny model, every row. This module runs those rows on
another model with the sizes a profile sets (the `gemma` profile: Gemma 3 270M built by
../shared/models/gemma3-270m.sh, C4 calibration, Alpaca training, WikiText-2 ppl), then gathers each row's figures
(stage seconds, the recovery curve, the eval's ppl and accuracies) from the stages' spp.json and the eval's
results.json into one JSON:

  nice .venv/bin/python -m benchmarks.recovery_study --profile tiny --out benchmarks/results/recovery_study_tiny.json
  nice .venv/bin/python -m benchmarks.recovery_study --profile gemma --model ~/models/gemma3-270m \
      --out benchmarks/results/recovery_study_gemma.json
  ... --rows all --rc-best --zero-shot boolq,rte,winogrande,arc_easy --deadline S --eval-reserve R
                (every row, then reconstruct + the best fine-tune; what scripts/device_study.sh runs on a GPU)
  ... --smoke   (the tiny profile's recipe written and checked by `spp run --dry-run`; nothing trains)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from benchmarks import common

RECIPE = common.REPO / "recipes" / "recovery-study.yaml"
STARTS = ("w24", "w70")  # the two pruned starting points (Wanda 2:4, Wanda 70% unstructured)
TRAINED = ("spp-sft", "spp-distill", "mlora-sft", "mlora-distill")  # each start's four fine-tunes
GEMMA_ROWS = ("w24", "w24-rc", "w24-spp-sft", "w24-spp-distill", "w24-mlora-sft", "w24-mlora-distill")
ALL_ROWS = tuple(f"{start}{suffix}" for start in STARTS
                 for suffix in ("", "-dsnot", "-rc", *(f"-{row}" for row in TRAINED)))
CALIB = "c4/c4-train.00000-of-01024.first1000.jsonl"
TRAIN = "alpaca/alpaca_small.json"
VALIDATION = "wikitext-2-raw-v1/validation.jsonl"  # the curves' ppl: WikiText-2's validation split, not its test


@dataclass(frozen=True)
class Sizes:
    """What the study costs on a real model. The defaults are what 2 CPU cores run in under an hour; the device
    run (scripts/device_study.sh) sets its own."""

    steps: int = 12  # fine-tune optimizer steps, the same for every trained row
    batch: int = 4  # Alpaca examples per step
    seqlen: int = 256  # fine-tune sequence length (longer examples are cut)
    val_size: int = 16  # held-out Alpaca examples scored at each curve point
    points: int = 3  # curve points after step 0 (eval_steps = steps // points)
    curve_windows: int = 0  # WikiText-2 validation windows of `seqlen` tokens scored at each point (0: none)
    eval_windows: int = 40  # WikiText-2 test windows of 512 tokens (and examples per zero-shot task)
    zero_shot: tuple[str, ...] = ()  # lm-eval tasks scored from local files
    eval_batch: int = 4  # the eval's sequences per forward
    reconstruct_epochs: int | None = 2  # None: EBFT's 10

    @property
    def budget(self) -> str:
        """Every fine-tune's budget, in words."""
        return f"{self.steps} steps x {self.batch} Alpaca examples (<= {self.seqlen} tokens each)"


def prune_stage(stage: dict, data: Path, sizes: Sizes) -> dict:
    stage = {**stage, "calib": str(data / CALIB), "seqlen": 512}
    if stage.get("refine") == "reconstruct" and sizes.reconstruct_epochs is not None:
        stage["reconstruct_epochs"] = sizes.reconstruct_epochs
    return stage


def finetune_stage(stage: dict, data: Path, sizes: Sizes) -> dict:
    stage = {key: value for key, value in stage.items() if not key.startswith("eval_ppl")}
    stage |= {"data": str(data / TRAIN), "batch_size": sizes.batch, "micro_batch_size": min(sizes.batch, 8),
              "seqlen": sizes.seqlen, "val_size": sizes.val_size, "eval_steps": max(1, sizes.steps // sizes.points),
              "max_steps": sizes.steps}
    if sizes.curve_windows:
        stage |= {"eval_ppl_source": f"ppl:{data / VALIDATION}", "eval_ppl_windows": sizes.curve_windows}
    return stage


def eval_stage(stage: dict, data: Path, sizes: Sizes, models: list[str]) -> dict:
    return {**stage, "models": ["dense", *models], "tasks": ["wikitext2", *sizes.zero_shot], "seqlen": 512,
            "limit": sizes.eval_windows, "batch_size": sizes.eval_batch, "data_dir": str(data)}


def gemma_profile(recipe: dict, model: str, data: Path, rows: tuple[str, ...], sizes: Sizes = Sizes()) -> dict:
    """The study's `rows` on a real model: C4 calibration (64 x 512), Alpaca training at `sizes`, WikiText-2 token
    ppl @512 and the zero-shot tasks of `sizes` in the eval stage."""
    stages = []
    for stage in recipe["stages"]:
        if stage["type"] == "prune" and stage["name"] in rows:
            stages.append(prune_stage(stage, data, sizes))
        elif stage["type"] == "finetune" and stage["name"] in rows:
            stages.append(finetune_stage(stage, data, sizes))
        elif stage["type"] == "eval":
            stages.append(eval_stage(stage, data, sizes, [m for m in stage["models"] if m in rows]))
    return {**recipe, "model": model, "stages": stages}


def manifest(stage: dict, output_dir: Path) -> dict | None:
    """The stage's spp.json, None while it has none (a stage is complete only with it)."""
    path = output_dir / stage["name"] / "spp.json"
    return json.loads(path.read_text()) if path.is_file() else None


def best_after_reconstruct(best: dict[str, dict], data: Path, sizes: Sizes) -> list[dict]:
    """Per start in `best` ({start: its best fine-tune's stage}), the row `<start>-rc-best`: the same fine-tune
    from the reconstructed prune `<start>-rc`."""
    return [finetune_stage({**stage, "name": f"{start}-rc-best", "input": f"{start}-rc"}, data, sizes)
            for start, stage in best.items()]


def with_best_after_reconstruct(recipe: dict, best: dict[str, dict], data: Path, sizes: Sizes) -> dict:
    """`recipe` with, per start in `best` ({start: its best fine-tune's stage}), a row `<start>-rc-best`: the same
    fine-tune from the reconstructed prune `<start>-rc`, placed before the eval stage, which scores it too."""
    *stages, evaluation = recipe["stages"]
    added = best_after_reconstruct(best, data, sizes)
    evaluation = {**evaluation, "models": [*evaluation["models"], *(stage["name"] for stage in added)]}
    return {**recipe, "stages": [*stages, *added, evaluation]}


def best_fine_tunes(recipe: dict, output_dir: Path) -> dict[str, dict]:
    """Per start whose reconstruction ran: its fine-tune with the lowest last-point WikiText-2 *validation* ppl
    (the held-out Alpaca loss without curve windows): chosen on validation data, never on the test split."""
    def last_point(tuned: tuple[dict, dict]) -> float:
        point = tuned[1]["training"]["curve"][-1]
        return point.get("ppl", point["held_out_loss"])

    best = {}
    names = {stage["name"] for stage in recipe["stages"]}
    for start in STARTS:
        tuned = [(stage, manifest(stage, output_dir)) for stage in recipe["stages"]
                 if stage["type"] == "finetune" and stage.get("input") == start]
        tuned = [pair for pair in tuned if pair[1] is not None]
        if f"{start}-rc" in names and tuned:
            best[start] = min(tuned, key=last_point)[0]
    return best


def study_recipe(profile: str, model: str | None, data: Path, output_dir: Path, rows: tuple[str, ...],
                 sizes: Sizes = Sizes()) -> dict:
    recipe = {key: value for key, value in yaml.safe_load(RECIPE.read_text()).items() if not key.startswith("x-")}
    if profile == "gemma":
        recipe = gemma_profile(recipe, model or str(common.REPO.parent / "models" / "gemma3-270m"), data, rows,
                               sizes)
    else:
        recipe["stages"][-1]["data_dir"] = str(data)
    return {**recipe, "output_dir": str(output_dir)}


def run_study(recipe_path: Path, dry_run: bool, timeout: float | None = None) -> bool:
    """`spp run` on the study's recipe in a child process (its output streamed through); whether it finished.
    Past `timeout` seconds the run is stopped (its finished stages stay: a stage is complete only with its
    spp.json) and reported unfinished."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "spp_cli", "run", str(recipe_path), *(["--dry-run"] if dry_run else [])]
    try:
        subprocess.run(command, check=True, env=env, cwd=common.REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"recovery_study: stopped after {timeout:.0f} s; scoring the rows that finished", flush=True)
        return False
    return True


def row_record(stage: dict, record: dict, results: dict) -> dict:
    """One row: what the stage did and cost (`record`, its spp.json) and how its model scored (the eval's
    results.json)."""
    training = record.get("training", {})
    row = {"row": stage["name"], "stage": stage["type"], "input": stage.get("input"),
           "method": stage.get("method"), "refine": stage.get("refine"), "objective": stage.get("objective", "sft"),
           "seconds": record.get("seconds"), "sparsity": record.get("overall_sparsity")}
    if training:
        row |= {"steps": training.get("steps"), "curve": training.get("curve"),
                "train_tokens": (training.get("curve") or [{}])[-1].get("train_tokens")}
    if record.get("warnings"):
        row["warnings"] = record["warnings"]
    scored = results.get("models", {}).get(stage["name"], {})
    row["ppl"] = {task: entry["value"] for task, entry in scored.get("perplexity", {}).items()}
    row["acc"] = {task: metrics.get("acc,none") for task, metrics in scored.get("results", {}).items()}
    return row


def collect(recipe: dict, output_dir: Path) -> list[dict]:
    """Every row that finished (a stage without its spp.json is left out); no scores when the eval did not run."""
    scored = output_dir / "eval" / "results.json"
    results = json.loads(scored.read_text()) if scored.is_file() else {}
    dense = results.get("models", {}).get("dense", {})
    rows = [{"row": "dense", "ppl": {t: e["value"] for t, e in dense.get("perplexity", {}).items()},
             "acc": {t: m.get("acc,none") for t, m in dense.get("results", {}).items()}}]
    records = [(stage, manifest(stage, output_dir)) for stage in recipe["stages"] if stage["type"] != "eval"]
    return rows + [row_record(stage, record, results) for stage, record in records if record is not None]


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


def gpu_name() -> str | None:
    """The GPU the study ran on (nvidia-smi's name and memory), None on a machine without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True).stdout.strip() or None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=("tiny", "gemma"), default="tiny")
    parser.add_argument("--model", help="gemma: the built model folder (../shared/models/gemma3-270m.sh)")
    parser.add_argument("--rows", default=",".join(GEMMA_ROWS), help="gemma: the stages to run ('all': every row)")
    parser.add_argument("--steps", type=int, default=Sizes.steps, help="gemma: fine-tune steps")
    parser.add_argument("--batch", type=int, default=Sizes.batch, help="gemma: Alpaca examples per step")
    parser.add_argument("--seqlen", type=int, default=Sizes.seqlen, help="gemma: fine-tune sequence length")
    parser.add_argument("--val-size", type=int, default=Sizes.val_size, help="gemma: held-out Alpaca examples")
    parser.add_argument("--points", type=int, default=Sizes.points, help="gemma: curve points after step 0")
    parser.add_argument("--curve-windows", type=int, default=0,
                        help="gemma: WikiText-2 validation windows scored at each curve point")
    parser.add_argument("--eval-windows", type=int, default=Sizes.eval_windows,
                        help="gemma: WikiText-2 test windows of 512 tokens (and examples per zero-shot task)")
    parser.add_argument("--eval-batch", type=int, default=None, help="gemma: the eval's sequences per forward")
    parser.add_argument("--zero-shot", default="", help="gemma: comma-separated lm-eval tasks (local data)")
    parser.add_argument("--reconstruct-epochs", type=int, default=Sizes.reconstruct_epochs,
                        help="gemma: reconstruction passes per block (0: EBFT's 10)")
    parser.add_argument("--rc-best", action="store_true",
                        help="gemma: then fine-tune each reconstructed prune the way that scored best from the plain "
                             "prune (lowest last-point validation ppl)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="gemma: seconds for the whole study: training stops in time for the eval's reserve, "
                             "and the eval scores the rows that finished")
    parser.add_argument("--eval-reserve", type=float, default=0.0, help="gemma: seconds kept for the eval")
    parser.add_argument("--data-dir", default=str(common.SHARED_DATA))
    parser.add_argument("--work", default=None, help="the run's output folder (default: a folder under runs/)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--table", help="print README's table from this JSON and stop")
    return parser.parse_args(argv)


def sizes_of(args: argparse.Namespace) -> Sizes:
    return Sizes(steps=args.steps, batch=args.batch, seqlen=args.seqlen, val_size=args.val_size, points=args.points,
                 curve_windows=args.curve_windows, eval_windows=args.eval_windows,
                 zero_shot=tuple(task for task in args.zero_shot.split(",") if task),
                 eval_batch=args.eval_batch or Sizes.eval_batch,
                 reconstruct_epochs=args.reconstruct_epochs or None)


class Phases:
    """The study run in phases, within an optional deadline: the training stages; with --rc-best, the chosen
    fine-tune from each reconstructed prune (if the slowest fine-tune so far fits twice in the time left before
    the eval's reserve); then the eval of every row that finished."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work, self.started = args, work, time.perf_counter()
        self.chosen: dict[str, str] = {}
        self.stopped: list[str] = []

    def left(self, reserve: bool = True) -> float | None:
        """Seconds left before the deadline (less the eval's reserve, unless `reserve` is False)."""
        if self.args.deadline is None:
            return None
        kept = self.args.eval_reserve if reserve else 0.0
        return self.args.deadline - kept - (time.perf_counter() - self.started)

    def run(self, recipe: dict, name: str, reserve: bool = True) -> None:
        path = self.work / f"recipe-{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        left = self.left(reserve)
        if not run_study(path, dry_run=False, timeout=None if left is None else max(left, 1.0)):
            self.stopped.append(name)

    def __call__(self, recipe: dict) -> dict:
        """Run `recipe`; the recipe of what ran (its eval scores the rows that finished)."""
        output_dir = Path(recipe["output_dir"])
        *training, evaluation = recipe["stages"]
        self.run({**recipe, "stages": training}, "training")
        if self.args.rc_best:
            training, evaluation = self.add_best_after_reconstruct(recipe, training, evaluation, output_dir)
        done = [stage for stage in training if manifest(stage, output_dir) is not None]
        names = {stage["name"] for stage in done}
        evaluation = {**evaluation, "models": [m for m in evaluation["models"] if m == "dense" or m in names]}
        ran = {**recipe, "stages": [*done, evaluation]}
        self.run(ran, "eval", reserve=False)
        return ran

    def add_best_after_reconstruct(self, recipe, training, evaluation, output_dir) -> tuple[list[dict], dict]:
        best = best_fine_tunes({**recipe, "stages": training}, output_dir)
        records = [manifest(stage, output_dir) for stage in training if stage["type"] == "finetune"]
        slowest = max((record.get("seconds") or 0 for record in records if record is not None), default=0)
        left = self.left()
        if not best or (left is not None and left < 2 * slowest):
            return training, evaluation
        added = best_after_reconstruct(best, Path(self.args.data_dir).resolve(), sizes_of(self.args))
        self.chosen = {start: stage["name"] for start, stage in best.items()}
        self.run({**recipe, "stages": [*training, *added]}, "rc-best")
        return [*training, *added], {**evaluation, "models": [*evaluation["models"], *(s["name"] for s in added)]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return 0
    work = Path(args.work or common.REPO / "runs" / f"recovery-study-{args.profile}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = ALL_ROWS if args.rows == "all" else tuple(args.rows.split(","))
    sizes = sizes_of(args)
    recipe = study_recipe(args.profile, args.model, Path(args.data_dir).resolve(), work / "run", rows, sizes)
    started = time.perf_counter()
    if args.smoke or args.profile == "tiny":
        (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        run_study(work / "recipe.yaml", dry_run=args.smoke)
        chosen, stopped = {}, []
    else:
        phases = Phases(args, work)
        recipe = phases(recipe)
        chosen, stopped = phases.chosen, phases.stopped
    seconds = round(time.perf_counter() - started, 1)
    report = {"benchmark": "recovery study: which recovery buys the most per training token",
              "profile": args.profile, "recipe": recipe, "seconds": seconds,
              "budget": sizes.budget if args.profile == "gemma" else None,
              "rc_best_chosen_from": chosen, "stopped_at_deadline": stopped, "gpu": gpu_name(),
              "machine": common.machine_info(loadavg_after=os.getloadavg()[0]),
              "rows": [] if args.smoke else collect(recipe, work / "run")}
    common.write_json(report, args.out or common.default_out(f"recovery_study_{args.profile}", args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`spp run`: the recipe's stages in order, each into <output_dir>/<stage name>/.

Each stage is the same library call as its CLI command, so a finished stage with the same options and parent
is skipped, an interrupted one resumes, and a changed one is rerun; a changed stage changes its manifest, so
every later stage (whose fingerprint includes its parent's manifest) is rerun too.
"""

import json
import time
from pathlib import Path

from spp_cli import interrupts
from spp_cli.errors import BadInput
from spp_cli.events import Listener, notify
from spp_cli.expectations import check_expectations, check_measured
from spp_cli.io.outputs import check_spp_output
from spp_cli.io.ownership import check_replaceable_file, write_owned
from spp_cli.recipe.resolve import EvalStage, FinetuneStage, PruneStage, Recipe, dump_resolved, load_recipe

RESULTS = "results.json"


def stage_output(recipe: Recipe, stage) -> Path:
    """A prune/finetune stage's checkpoint folder, an eval stage's results.json."""
    directory = recipe.stage_dir(stage.name)
    return directory / RESULTS if isinstance(stage, EvalStage) else directory


def model_path(recipe: Recipe, reference: str) -> str:
    """A stage's model reference -> what to load: dense is the recipe's model, a stage name its output."""
    if reference == "dense":
        return recipe.model
    if reference in recipe.stage_names:
        return str(recipe.stage_dir(reference))
    return reference


def run_stage(recipe: Recipe, stage, on_event: Listener | None = None) -> dict:
    from spp_cli.stages.evaluate import evaluate_models
    from spp_cli.stages.finetune import finetune
    from spp_cli.stages.prune import prune

    directory = recipe.stage_dir(stage.name)
    # a stage folder spp wrote is replaced when the recipe changed (the point of `spp run`); anything else in its
    # place is refused by the stage (spp_cli/io/outputs.py)
    replace = True
    loading = {"trust_remote_code": recipe.trust_remote_code, "allow_pickle": recipe.allow_pickle}
    options = stage.command_options()
    if isinstance(stage, PruneStage):
        return prune(
            model_path(recipe, stage.input), directory, overwrite=replace, on_event=on_event, **loading, **options
        )
    if isinstance(stage, FinetuneStage):
        return finetune(
            model_path(recipe, stage.input), directory, overwrite=replace, on_event=on_event, **loading, **options
        )
    models = {name: model_path(recipe, name) for name in options.pop("models")}
    return evaluate_models(models, options.pop("tasks"), directory / RESULTS, overwrite=replace, on_event=on_event,
                           **loading, **options)


def check_recipe(recipe: Recipe) -> None:
    """Every check that needs no model weights, stage by stage (spp_cli/preflight.py): the stage functions' own
    checks, with a stage's not-yet-written input standing in for by its root model's architecture. `spp run` makes
    them all before the first stage starts; `--dry-run` makes only them."""
    from spp_cli import preflight

    def existing(reference: str) -> str | None:
        """What a stage reads, when it exists before the run (None: an earlier stage's output)."""
        return None if reference in recipe.stage_names else model_path(recipe, reference)

    def architecture(reference: str) -> str:
        """A stage's output has its root model's shapes."""
        while reference in recipe.stage_names:
            reference = recipe.stage(reference).input
        return model_path(recipe, reference)

    loading = {"allow_pickle": recipe.allow_pickle, "trust_remote_code": recipe.trust_remote_code}
    check_measured(recipe.expect, recipe)  # a pin on something no stage measures fails now, not after the run
    for name in ("run.json", "report.md"):  # written at the end: a user's file there is refused now, not then
        check_replaceable_file(Path(recipe.output_dir) / name)
    for stage in recipe.stages:
        preflight.check_writable(stage_output(recipe, stage))
        check_spp_output(stage_output(recipe, stage))  # a user's folder there is refused now, as the stage would
        if isinstance(stage, PruneStage):
            preflight.check_prune(stage, existing(stage.input), architecture=architecture(stage.input), **loading)
        elif isinstance(stage, FinetuneStage):
            pruned_by = recipe.stage(stage.input) if stage.input in recipe.stage_names else None
            adapted = {"targets": pruned_by.targets, "ignore": pruned_by.ignore} if isinstance(
                pruned_by, PruneStage) else None
            preflight.check_finetune(stage, existing(stage.input), architecture=architecture(stage.input),
                                     adapted=adapted, **loading)
        elif isinstance(stage, EvalStage):
            preflight.check_eval(stage, {name: existing(name) for name in stage.reads()},
                                 architectures={name: architecture(name) for name in stage.reads()}, **loading)


def stage_summary(stage, output: Path, result: dict, wall_seconds: float, existed: bool) -> dict:
    """run.json's entry for one stage. "state": ran; skipped (finished earlier with the same options); resumed (an
    interrupted run continued; "resumed_from": "after block N" or "after step N"); rerun (changed options replaced
    an earlier output). "seconds": the stage's own measured time from its spp.json when it has one (the number
    report.md shows), else the wall time of the call (eval)."""
    entry = {"name": stage.name, "type": stage.TYPE, "output": str(output), "skipped": bool(result.get("skipped"))}
    resumed_block = result.get("resumed_from_block")
    resumed_checkpoint = (result.get("run") or {}).get("resumed_from")
    if entry["skipped"]:
        entry["state"] = "skipped"
    elif resumed_block or resumed_checkpoint:
        entry["state"] = "resumed"
        entry["resumed_from"] = (f"after block {resumed_block}" if resumed_block
                                 else f"after step {resumed_checkpoint.rsplit('-', 1)[-1]}")
    else:
        entry["state"] = "rerun" if existed else "ran"
    entry["seconds"] = round(result.get("seconds", wall_seconds), 2)
    return entry


def run_recipe(
    recipe_file: str | Path, overrides: list[str], *, dry_run: bool = False, on_event: Listener | None = None
) -> dict:
    """Run (or with dry_run only validate) a recipe; returns a summary of every stage and the last evaluation."""
    recipe = load_recipe(recipe_file, overrides)
    summary = {"recipe": str(recipe_file), "output_dir": recipe.output_dir, "dry_run": dry_run, "stages": []}
    if recipe.sweeps:  # which stages a sweep: became (spp_cli/recipe/sweep.py), for the report's pick
        summary["sweeps"] = recipe.sweeps
    check_recipe(recipe)  # a bad later stage fails now, not after the earlier stages' work
    if dry_run:
        from spp_cli.memory_plan.stages import recipe_plans

        plans = recipe_plans(recipe)  # estimated peak CPU RAM, device memory, disk; what may not fit
        summary["stages"] = [
            {"name": s.name, "type": s.TYPE, "output": str(stage_output(recipe, s)), "options": s.options(),
             "plan": plans[s.name]}
            for s in recipe.stages
        ]
        return summary
    output_dir = Path(recipe.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stage in recipe.stages:
        notify(on_event, "run", "stage", {"name": stage.name, "type": stage.TYPE})
        output = stage_output(recipe, stage)
        existed = (output / "spp.json").is_file() if isinstance(stage, (PruneStage, FinetuneStage)) else (
            output.is_file())
        started = time.time()
        with interrupts.more_to_come():  # a Ctrl-C after a stage's publish interrupts the run; the rerun goes on
            result = run_stage(recipe, stage, on_event)
        (output.parent if output.suffix else output).mkdir(parents=True, exist_ok=True)
        write_owned((output.parent if output.suffix else output) / "recipe.yaml", dump_resolved(recipe, stage))
        summary["stages"].append(stage_summary(stage, output, result, time.time() - started, existed))
        if isinstance(stage, EvalStage):
            summary["evaluation"] = result["models"]
            summary["notes"] = list(dict.fromkeys([*summary.get("notes", []), *result.get("notes", [])]))
    for entry in summary["stages"]:
        if entry["name"] in (summary.get("evaluation") or {}):
            summary["evaluation"][entry["name"]].setdefault("stage_seconds", entry["seconds"])
    write_owned(output_dir / "run.json", json.dumps(summary, indent=2, default=str) + "\n")
    interrupts.output_published()  # every stage and run.json are in place: the run is done
    try:
        from spp_cli.report import write_report

        summary["report"] = write_report(output_dir)["report"]
    except BadInput as error:
        summary["report_error"] = str(error)
    if recipe.expect:  # the CLI prints the verdict and exits 1 on a miss
        from spp_cli.report import read_stages

        summary["expectations"] = check_expectations(recipe.expect, *read_stages(output_dir))
    return summary

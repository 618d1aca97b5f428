"""`spp run`: the recipe's stages in order, each into <output_dir>/<stage name>/.

Each stage is the same library call as its CLI command, so a finished stage with the same options and parent
is skipped, an interrupted one resumes, and a changed one is rerun; a changed stage changes its manifest, so
every later stage (whose fingerprint includes its parent's manifest) is rerun too.
"""

import json
import time
from pathlib import Path

from spp_cli.errors import BadInput
from spp_cli.recipe import EvalStage, FinetuneStage, PruneStage, Recipe, dump_resolved, load_recipe

RESULTS = "results.json"


def stage_output(recipe: Recipe, stage) -> Path:
    directory = Path(recipe.output_dir) / stage.name
    return directory / RESULTS if isinstance(stage, EvalStage) else directory


def model_path(recipe: Recipe, reference: str) -> str:
    """A stage's model reference -> what to load: dense is the recipe's model, a stage name its output."""
    if reference == "dense":
        return recipe.model
    if reference in recipe.stage_names:
        return str(Path(recipe.output_dir) / reference)
    return reference


def run_stage(recipe: Recipe, stage, console) -> dict:
    from spp_cli.render import event_printer, step_progress
    from spp_cli.stages.evaluate import evaluate_models
    from spp_cli.stages.finetune import finetune
    from spp_cli.stages.prune import prune

    directory = Path(recipe.output_dir) / stage.name
    # a stage folder spp wrote is replaced when the recipe changed (the point of `spp run`); anything else in its
    # place is refused by the stage (spp_cli/outputs.py)
    replace = True
    loading = {"trust_remote_code": recipe.trust_remote_code, "allow_pickle": recipe.allow_pickle}
    options = stage.command_options()
    if isinstance(stage, PruneStage):
        return prune(
            model_path(recipe, stage.input), directory, overwrite=replace,
            on_event=event_printer(console) if console is not None else None, **loading, **options,
        )
    if isinstance(stage, FinetuneStage):
        return finetune(
            model_path(recipe, stage.input), directory, overwrite=replace, console=console, **loading, **options
        )
    models = {name: model_path(recipe, name) for name in options.pop("models")}
    return evaluate_models(
        models, options.pop("tasks"), directory / RESULTS, skip_if_done=True, overwrite=replace,
        on_progress=step_progress(console) if console is not None else None, **loading, **options,
    )


def check_recipe(recipe: Recipe) -> None:
    """What `--dry-run` promises: every check that needs no model weights, stage by stage (spp_cli/preflight.py)."""
    from spp_cli import preflight
    from spp_cli.adapters import method_named
    from spp_cli.eval.engine import validate_tasks

    def base_model(reference: str) -> str:
        """The architecture a stage works on: a stage's output has its root model's shapes."""
        while reference in recipe.stage_names:
            reference = recipe.stage(reference).input
        return model_path(recipe, reference)

    for stage in recipe.stages:
        preflight.check_writable(stage_output(recipe, stage))
        for reference in stage.reads():
            if reference not in recipe.stage_names:
                preflight.check_model_reference(model_path(recipe, reference), recipe.allow_pickle)
        if isinstance(stage, PruneStage) and stage.method != "magnitude":
            preflight.check_source(stage.calib)
        elif isinstance(stage, FinetuneStage):
            preflight.check_source(stage.data)
            preflight.check_report_to(stage.report_to)
            groups = method_named(stage.method).options.get("groups")  # None: the method has no row groups
            if groups is not None:
                pruned_by = recipe.stage(stage.input) if stage.input in recipe.stage_names else None
                narrowed = isinstance(pruned_by, PruneStage)
                preflight.check_groups_divide(
                    base_model(stage.input), stage.groups or groups, pruned_by.targets if narrowed else None,
                    pruned_by.ignore if narrowed else None, recipe.trust_remote_code,
                )
        elif isinstance(stage, EvalStage):
            validate_tasks(stage.tasks, data_dir=stage.data_dir)


def run_recipe(
    recipe_file: str | Path, overrides: list[str], *, dry_run: bool = False, console=None
) -> dict:
    """Run (or with dry_run only validate) a recipe; returns a summary of every stage and the last evaluation."""
    recipe = load_recipe(recipe_file, overrides)
    summary = {"recipe": str(recipe_file), "output_dir": recipe.output_dir, "dry_run": dry_run, "stages": []}
    if dry_run:
        check_recipe(recipe)
        summary["stages"] = [
            {"name": s.name, "type": s.TYPE, "output": str(stage_output(recipe, s)), "options": s.options()}
            for s in recipe.stages
        ]
        return summary
    output_dir = Path(recipe.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stage in recipe.stages:
        if console is not None:
            console.print(f"stage {stage.name} ({stage.TYPE}) ...")
        started = time.time()
        result = run_stage(recipe, stage, console)
        seconds = time.time() - started
        output = stage_output(recipe, stage)
        skipped = bool(result.get("skipped"))
        (output.parent if output.suffix else output).mkdir(parents=True, exist_ok=True)
        (output.parent if output.suffix else output).joinpath("recipe.yaml").write_text(dump_resolved(recipe, stage))
        summary["stages"].append(
            {
                "name": stage.name,
                "type": stage.TYPE,
                "output": str(output),
                "skipped": skipped,
                "seconds": round(result.get("seconds", seconds) if skipped else seconds, 2),
            }
        )
        if isinstance(stage, EvalStage):
            summary["evaluation"] = result["models"]
    for stage_summary in summary["stages"]:
        if stage_summary["name"] in (summary.get("evaluation") or {}):
            summary["evaluation"][stage_summary["name"]].setdefault("stage_seconds", stage_summary["seconds"])
    (output_dir / "run.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    try:
        from spp_cli.report import write_report

        summary["report"] = write_report(output_dir)["report"]
    except BadInput as error:
        summary["report_error"] = str(error)
    return summary

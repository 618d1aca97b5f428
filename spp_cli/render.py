"""Console output for people (rich). Every number says what it is; scripts use `--format json` instead."""

import math

from rich.table import Table


def block_progress(console):
    """A callback printing one line per pruned block: its time and relative reconstruction error."""

    def on_block(report) -> None:
        total = getattr(report, "total", None)
        position = f"{report.index + 1}/{total}" if total else f"{report.index + 1}"
        error = report.reconstruction_error
        measured = error is not None and not math.isnan(error)
        windows = getattr(report, "error_windows", None)
        before = getattr(report, "error_before_reconstruct", None)
        trained = f"{before:.4g} before reconstruct, {error:.4g} after" if before is not None else f"{error:.4g}"
        error_text = (trained + (f" (first {windows} windows)" if windows else "")) if measured else (
            "n/a (no calibration)")
        owl = "" if report.outlier_ratio is None else (
            f", OWL sparsity {report.sparsity:.4f} (outlier ratio {report.outlier_ratio:.2f}%)")
        console.print(
            f"  block {position}: {report.seconds:.2f} s, relative output error ||Y-Ŷ||²/||Y||² {error_text}{owl}"
        )

    return on_block


def training_progress(console, every: int | None = None):
    """A callback for spp_cli.training.progress.TrainingProgress: the first and the last step, and a step with a
    logged loss once `every` steps have passed since the last line (about 10 lines a run when None), each saying
    what its numbers are (the loss and lr of spp.json's loss_curve for that step)."""
    printed = {"step": 0}

    def on_update(event: dict) -> None:
        step, total = event["step"], event["total"]
        interval = every or max(1, total // 10)
        due = event["loss"] is not None and step - printed["step"] >= interval
        if step not in (1, total) and not due and event["resumed_from"] != step - 1:
            return
        printed["step"] = step
        parts = [f"step {step}/{total}"]
        if event["resumed_from"] and event["resumed_from"] == step - 1:
            parts.append(f"resumed after step {event['resumed_from']}")
        if event["loss"] is not None:
            parts.append(f"train loss {event['loss']:.4f} (mean since the last log)")
        if event["lr"] is not None:
            parts.append(f"lr {event['lr']:.3g}")
        if event["tokens_per_second"]:
            parts.append(f"{event['tokens_per_second']:.0f} tokens/s (padded)")
        if event["eta_seconds"] is not None:
            parts.append(f"ETA {event['eta_seconds']:.0f} s")
        console.print("  " + ", ".join(parts))

    return on_update


def step_progress(console, share: float = 0.1):
    """A callback on_progress(done, total, label) printing "label k/N" at the start, the end and about every
    `share` of the way, for evaluation (models, perplexity windows, zero-shot tasks)."""
    shown: dict[str, int] = {}

    def on_progress(done: int, total: int, label: str) -> None:
        if label == "models":  # the end of the last model: its table follows
            return
        if label.startswith("model ") and "·" not in label:  # "model k/N NAME" as model k starts
            console.print(label)
            return
        last = shown.get(label)
        if done in (0, total) or last is None or done - last >= max(1, round(total * share)):
            if last != done:
                console.print(f"  {label} {done}/{total}")
            shown[label] = done

    return on_progress


def event_printer(console):
    """The one listener the CLI gives every stage (spp_cli/events.py): each event kind drawn as a console line."""
    on_block, on_step, on_progress = block_progress(console), training_progress(console), step_progress(console)

    def on_event(event) -> None:
        if event.kind == "block":
            on_block(event.payload)
        elif event.kind == "step":
            on_step(event.payload)
        elif event.kind == "progress":
            on_progress(event.payload["done"], event.payload["total"], event.payload["label"])
        elif event.kind == "warning":
            console.print(f"spp: warning: {event.payload}")
        elif event.kind == "stage":
            console.print(f"stage {event.payload['name']} ({event.payload['type']}) ...")
        elif event.kind == "plan":
            from spp_cli.memory_plan import plan_text

            console.print(f"spp: {plan_text(event.payload)}")
        else:
            console.print(f"spp: {event.payload}")

    return on_event


def _skipped(console, manifest: dict, out) -> bool:
    if manifest.get("skipped"):
        console.print(
            f"{out} is already complete with these options (skipped; made in {manifest.get('seconds', 0):.1f} s)"
        )
    return bool(manifest.get("skipped"))


def render_prune(console, manifest: dict, out) -> None:
    if _skipped(console, manifest, out):
        return
    console.print(
        f"pruned {len(manifest['layers'])} linears with {manifest['method']} ({manifest['pattern']}): "
        f"overall sparsity of the pruned linears {manifest['overall_sparsity']:.4f} "
        f"(target {manifest['target_sparsity']:.4f}) in {manifest.get('seconds', 0):.1f} s -> {out}"
    )
    for line in prune_details(manifest):
        console.print(f"  {line}")
    for warning in manifest.get("warnings") or []:
        console.print(f"  warning: {warning}")
    for name, damping in (manifest.get("damping") or {}).items():
        console.print(f"  note: {name} needed Hessian damping {damping} (more than 1% of the mean diagonal)")


def resumed_blocks_text(first_block: int) -> str:
    """What a resume kept, for a run that started at (0-based) `first_block`."""
    kept = "block 1 was" if first_block == 1 else f"blocks 1-{first_block} were"
    return f"resumed: {kept} pruned by the interrupted run"


def prune_details(manifest: dict) -> list[str]:
    """The prune summary's detail lines: the calibration data, OWL and DSnoT when used, and a resume."""
    config = manifest.get("config") or {}
    lines = []
    if config.get("calib"):
        lines.append(f"calibration: {config.get('nsamples')} windows of {config.get('seqlen')} tokens from "
                     f"{config['calib']} (nsamples, seqlen)")
    else:
        lines.append("calibration: none (magnitude reads only the weights)")
    profile = manifest.get("sparsity_profile") or {}
    if profile.get("profile") == "owl":
        sparsities = list((profile.get("layer_sparsity") or {}).values()) or [0.0]
        lines.append(f"OWL sparsity profile (threshold {profile.get('threshold')}, lambda {profile.get('lambda')}): "
                     f"block sparsities {min(sparsities):.4f} to {max(sparsities):.4f}")
    if manifest.get("refine") == "dsnot":
        lines.append("DSnoT refined the masks (prune-and-grow within each row, same sparsity)")
    if manifest.get("resumed_from_block"):
        lines.append(resumed_blocks_text(manifest["resumed_from_block"]))
    return lines


def render_finetune(console, manifest: dict, out) -> None:
    if _skipped(console, manifest, out):
        return
    training = manifest.get("training") or {}
    losses = [f"{point['loss']:.4f}" for point in training.get("loss_curve") or []]
    loss_text = f"{losses[0]} -> {losses[-1]}" if len(losses) > 1 else (losses[0] if losses else "n/a")
    eval_loss = training.get("eval_loss")
    eval_text = f", held-out loss {eval_loss:.4f}" if isinstance(eval_loss, float) else ""
    console.print(
        f"{manifest.get('method', 'spp')} fine-tune: {training.get('steps', '?')} steps, train loss {loss_text}"
        f"{eval_text}, {manifest.get('seconds', 0):.1f} s -> {out}"
    )
    resumed = (manifest.get("run") or {}).get("resumed_from")
    if resumed:
        console.print(f"  resumed from {resumed} (the result equals an uninterrupted run's)")
    if not manifest.get("dense") and not manifest.get("merged", True):
        console.print(f"  adapter only (not merged): {out}/adapter; merge it with `spp merge {out}/adapter --out DIR`")
    else:
        console.print(f"  {zero_check_text(manifest)}")
    for warning in manifest.get("warnings") or []:
        console.print(f"  warning: {warning}")


def render_merge(console, manifest: dict, out) -> None:
    """`spp merge`: what was merged into what, and the zero check (or why there was none)."""
    if _skipped(console, manifest, out):
        return
    method, layers = manifest.get("method", "spp"), len(manifest.get("layers") or {})
    parent = (manifest.get("parent") or {}).get("path", "its base")
    console.print(f"merged the {method} adapter into {parent}: {layers} pruned linears, "
                  f"{manifest.get('seconds', 0):.1f} s -> {out}")
    console.print(f"  {zero_check_text(manifest)}")
    for warning in manifest.get("warnings") or []:
        console.print(f"  warning: {warning}")


def zero_check_text(manifest: dict) -> str:
    """A merged model's zeros: kept (the overall sparsity), or gone with a dense method's merge."""
    if manifest.get("dense"):
        return f"note: the {manifest.get('method', 'lora')} merge makes every weight dense; the zero check was skipped"
    return f"zeros kept: overall sparsity of the pruned linears {manifest.get('overall_sparsity', 0):.4f}"


def short_task_name(task: str) -> str:
    """`ppl:builtin:python-docs:test` -> `python-docs:test`; `ppl:/data/x.jsonl` -> `x.jsonl`."""
    if not task.startswith("ppl:"):
        return task
    source = task[4:]
    return source.split(":", 1)[1] if source.startswith("builtin:") else source.rsplit("/", 1)[-1]


def metric_columns(entries: dict) -> list[tuple[str, str, str]]:
    """(column title, section, key) for every metric any model has, perplexities first."""
    columns, seen = [], set()
    for entry in entries.values():
        for task, value in (entry.get("perplexity") or {}).items():
            title = f"{short_task_name(task)} token ppl @{value.get('seqlen')}"
            if title not in seen:
                seen.add(title)
                columns.append((title, "perplexity", task))
    for entry in entries.values():
        for task, metrics in (entry.get("results") or {}).items():
            for metric in ("acc,none", "word_perplexity,none"):
                title = f"{task} {metric.split(',')[0]}"
                if metric in metrics and title not in seen:
                    seen.add(title)
                    columns.append((title, "results", f"{task}|{metric}"))
    if any(entry.get("mean_acc_7") is not None for entry in entries.values()):
        columns.append(("mean acc (7 tasks)", "mean_acc_7", ""))
    return columns


def metric_number(entry: dict, section: str, key: str):
    """The value of a metric_columns column in one model's results (None when it has none)."""
    if section == "perplexity":
        return (entry.get("perplexity") or {}).get(key, {}).get("value")
    if section == "results":
        task, metric = key.split("|")
        return (entry.get("results") or {}).get(task, {}).get(metric)
    return entry.get("mean_acc_7")


def metric_value(entry: dict, section: str, key: str) -> str:
    value = metric_number(entry, section, key)
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def eval_table(entries: dict, extra_columns: dict[str, dict[str, str]] | None = None) -> Table:
    """One row per model: sparsity, every metric, and optional extra columns (e.g. seconds per stage)."""
    table = Table(title="evaluation")
    table.add_column("model")
    table.add_column("sparsity of pruned linears", justify="right")
    columns = metric_columns(entries)
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    extra_titles = sorted({title for values in (extra_columns or {}).values() for title in values})
    for title in extra_titles:
        table.add_column(title, justify="right")
    for name, entry in entries.items():
        sparsity = (entry.get("model") or {}).get("sparsity")
        row = [name, f"{sparsity:.4f}" if isinstance(sparsity, float) else "0 (dense)"]
        row += [metric_value(entry, section, key) for _, section, key in columns]
        row += [(extra_columns or {}).get(name, {}).get(title, "-") for title in extra_titles]
        table.add_row(*row)
    return table


def bos_line(entries: dict) -> str | None:
    """One line saying which zero-shot BOS rule each model used (None when no zero-shot task ran)."""
    rules = {}
    for name, entry in entries.items():
        bos = entry.get("bos")
        if bos:
            prepended = "BOS prepended" if bos.get("prepends_bos") else "no BOS"
            rules.setdefault(f"{bos.get('rule')} ({prepended})", []).append(name)
    if not rules:
        return None
    if len(rules) == 1:
        return f"zero-shot BOS rule: {next(iter(rules))}"
    return "zero-shot BOS rule: " + "; ".join(f"{', '.join(names)}: {rule}" for rule, names in rules.items())


def render_eval(console, results: dict) -> None:
    """The table of `results` (stages.evaluate.evaluate_models' return: {"models": {name: entry}, "notes"})."""
    entries = results.get("models", {})
    console.print(eval_table(entries))
    if line := bos_line(entries):
        console.print(line)
    for note in results.get("notes", []):
        console.print(f"note: {note}")


def render_verify(console, report: dict) -> None:
    verdict = "OK" if report["ok"] else "FAILED"
    against = f" against {report['against']}" if report["against"] else ""
    console.print(
        f"verify {report['directory']}{against}: {verdict} — {report['layers_checked']} layers, pattern "
        f"{report['pattern']}, lost zeros {report['lost_zeros']}, extra zeros {report['extra_zeros']} (allowed), "
        f"broken N:M groups {report['broken_groups']}"
    )
    for problem in report["problems"]:
        console.print(f"  {problem}")


def render_run(console, summary: dict) -> None:
    if summary.get("dry_run"):
        console.print(
            f"recipe {summary['recipe']} is valid and its inputs check out (nothing was loaded); stages: "
            + ", ".join(f"{stage['name']} ({stage['type']}) -> {stage['output']}" for stage in summary["stages"])
        )
        for stage in summary["stages"]:
            plan_lines(console, stage["name"], stage.get("plan"))
        return
    entries = summary.get("evaluation") or {}
    seconds = {stage["name"]: stage for stage in summary["stages"]}
    extra = {}
    for name in entries:
        if name in seconds:
            extra[name] = {
                "stage seconds": f"{seconds[name]['seconds']:.1f}" + (" (skipped)" if seconds[name]["skipped"] else "")
            }
    if entries:
        console.print(eval_table(entries, extra))
    for note in summary.get("notes") or []:
        console.print(f"note: {note}")
    for stage in summary["stages"]:
        console.print(f"stage {stage['name']} ({stage['type']}): {stage_state_text(stage)} -> {stage['output']}")
    if summary.get("report"):
        console.print(f"report: {summary['report']}")
    if summary.get("expectations"):  # the recipe's pinned results (spp_cli/expectations.py)
        from spp_cli.expectations import verdict

        for line in verdict(summary["expectations"]):
            console.print(line, markup=False, highlight=False)


def plan_lines(console, name: str, plan: dict | None) -> None:
    """`spp run --dry-run`: a stage's memory plan (spp_cli/memory_plan) and what may not fit, with the fix."""
    from spp_cli.memory_plan import StagePlan, plan_text

    if plan is None:
        console.print(f"  {name}: plan: unknown (the model's config could not be read without its weights)")
        return
    console.print(f"  {name}: {plan_text(StagePlan(**plan))}")
    for fix in plan["fixes"]:
        console.print(f"    warning: {fix}")


def stage_state_text(stage: dict) -> str:
    """What `spp run` did with a stage (pipeline.stage_summary's "state") and its seconds."""
    state = stage.get("state", "skipped" if stage["skipped"] else "ran")
    if state == "skipped":
        return "skipped (finished earlier with the same options)"
    seconds = f"{stage['seconds']:.1f} s"
    if state == "resumed":
        return f"resumed {stage['resumed_from']} of the interrupted run, {seconds}"
    if state == "rerun":
        return f"rerun (changed options replaced the earlier output), {seconds}"
    return seconds


def render_env(console, report: dict) -> None:
    table = Table(title="spp env", show_header=False)
    for key in ("python", "platform", "cuda_available", "cpu_threads", "hf_cache", "spp_cache", "offline"):
        table.add_row(key, str(report[key]))
    table.add_row("devices", ", ".join(report["devices"]))
    for name, version in report["packages"].items():
        table.add_row(name, version or "not installed")
    console.print(table)

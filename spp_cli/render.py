"""Console output for people (rich). Every number says what it is; scripts use `--format json` instead."""

from rich.table import Table


def block_progress(console):
    """A callback printing one line per pruned block: its time and relative reconstruction error."""

    def on_block(report) -> None:
        total = getattr(report, "total", None)
        position = f"{report.index + 1}/{total}" if total else f"{report.index + 1}"
        error = report.reconstruction_error
        error_text = f"{error:.4g}" if error is not None else "n/a (no calibration)"
        console.print(f"  block {position}: {report.seconds:.2f} s, relative output error ||Y-Ŷ||²/||Y||² {error_text}")

    return on_block


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
    for name, damping in (manifest.get("damping") or {}).items():
        console.print(f"  note: {name} needed Hessian damping {damping} (more than 1% of the mean diagonal)")


def render_finetune(console, manifest: dict, out) -> None:
    if _skipped(console, manifest, out):
        return
    training = manifest.get("training") or {}
    losses = training.get("loss_curve") or []
    first = f"{losses[0]['loss']:.4f}" if losses else "n/a"
    last = f"{losses[-1]['loss']:.4f}" if losses else "n/a"
    eval_loss = training.get("eval_loss")
    eval_text = f", held-out loss {eval_loss:.4f}" if isinstance(eval_loss, float) else ""
    console.print(
        f"{manifest.get('method', 'spp')} fine-tune: {training.get('steps', '?')} steps, train loss {first} -> {last}"
        f"{eval_text}, {manifest.get('seconds', 0):.1f} s -> {out}"
    )
    if manifest.get("dense"):
        console.print("  note: the LoRA merge makes every weight dense; the zero check was skipped")
    elif not manifest.get("merged", True):
        console.print(f"  adapter only (not merged): {out}/adapter; merge it with `spp merge {out}/adapter --out DIR`")
    else:
        console.print(f"  zeros kept: overall sparsity of the pruned linears {manifest.get('overall_sparsity', 0):.4f}")


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


def metric_value(entry: dict, section: str, key: str) -> str:
    if section == "perplexity":
        value = (entry.get("perplexity") or {}).get(key, {}).get("value")
    elif section == "results":
        task, metric = key.split("|")
        value = (entry.get("results") or {}).get(task, {}).get(metric)
    else:
        value = entry.get("mean_acc_7")
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
            f"recipe {summary['recipe']} is valid; stages: "
            + ", ".join(f"{stage['name']} ({stage['type']}) -> {stage['output']}" for stage in summary["stages"])
        )
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
    for stage in summary["stages"]:
        state = "skipped (already complete)" if stage["skipped"] else f"{stage['seconds']:.1f} s"
        console.print(f"stage {stage['name']} ({stage['type']}): {state} -> {stage['output']}")
    if summary.get("report"):
        console.print(f"report: {summary['report']}")

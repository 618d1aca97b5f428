"""`spp report RUN_DIR`: a markdown report and PNG plots from what the stages wrote (spp.json, results.json).

Plots: metrics per evaluated model, per-layer sparsity of every model stage, the fine-tune loss curve, with
several fine-tunes of one parent (recipes/compare-recovery.yaml) the recovery table and its plot, and for a prune
with `sparsity_profile: owl` each block's OWL sparsity against the uniform target (table, text bars and plot).
Nothing is recomputed: the report reads the stage folders only (the recovery table's zero check reads their weights).
"""

import json
import os
from pathlib import Path

from spp_cli.errors import BadInput
from spp_cli.io.ownership import check_replaceable_file, remember, write_owned
from spp_cli.plots import (
    curves_figure,
    loss_figure,
    metrics_figure,
    model_colours,
    pyplot,
    recovery_figure,
    sparsity_figure,
)


def read_stages(run_dir: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(model stages: name -> spp.json, evaluations: model name -> results object), in folder order."""
    from spp_cli.stages.evaluate import results_entries

    for name, what in (("spp.json", "a model folder"), ("results.json", "an eval result's folder")):
        if (run_dir / name).is_file():  # a stage's own output, not the run folder that holds the stages
            parent = f" (its parent '{run_dir.parent}', if a `spp run` wrote it)" if (
                run_dir.parent / "run.json").is_file() else ""
            raise BadInput(f"'{run_dir}' is {what} ({name}), not a run folder: give the output_dir of a `spp run`"
                           f"{parent}")
    manifests, evaluations = {}, {}
    summary_file = run_dir / "run.json"
    order = [s["name"] for s in json.loads(summary_file.read_text())["stages"]] if summary_file.exists() else None
    folders = [run_dir / name for name in order] if order else sorted(p for p in run_dir.iterdir() if p.is_dir())
    for folder in folders:
        if (folder / "spp.json").is_file():
            manifests[folder.name] = json.loads((folder / "spp.json").read_text())
        if (folder / "results.json").is_file():
            results_file = folder / "results.json"
            evaluations.update(results_entries(json.loads(results_file.read_text()), str(results_file)))
    return manifests, evaluations


def _save(figure, path: Path) -> bool:
    """Save a laid-out figure (spp_cli/plots.py) as a plot spp owns (never over a user's file of that name;
    spp_cli/io/ownership.py); False when there was nothing to plot (None)."""
    if figure is None:
        return False
    check_replaceable_file(path)
    staging = path.with_name(f".{path.stem}.spp-staging-{os.getpid()}{path.suffix}")
    figure.savefig(staging, dpi=110)
    pyplot().close(figure)
    os.replace(staging, path)
    remember(path.parent, [path.name])
    return True


def markdown_table(evaluations: dict, manifests: dict) -> str:
    from spp_cli.render import metric_columns, metric_value

    columns = metric_columns(evaluations)
    header = ["model", "sparsity of pruned linears", *(title for title, _, _ in columns), "stage seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in evaluations.items():
        sparsity = (entry.get("model") or {}).get("sparsity")
        seconds = (manifests.get(name) or {}).get("seconds")
        row = [name, f"{sparsity:.4f}" if isinstance(sparsity, float) else "0 (dense)"]
        row += [metric_value(entry, section, key) for _, section, key in columns]
        row.append(f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _first_perplexity(entry: dict | None) -> float | None:
    for value in ((entry or {}).get("perplexity") or {}).values():
        if isinstance(value.get("value"), float):
            return value["value"]
    return None


def recovery_rows(run_dir: Path, manifests: dict, evaluations: dict) -> list[dict]:
    """One row per fine-tune stage: method, trainable parameters, zeros kept (verified against its parent's
    weights), step seconds and peak memory (adapter/run.json), perplexity (the first perplexity task) and the
    share of the pruning gap recovered, (ppl_pruned - ppl) / (ppl_pruned - ppl_dense)."""
    from spp_cli.stages.verify import verify_checkpoint

    folders = {str((run_dir / name).resolve()): name for name in manifests}
    dense_ppl = _first_perplexity(evaluations.get("dense"))
    rows = []
    for name, manifest in manifests.items():
        if manifest.get("stage") != "finetune":
            continue
        parent_dir = (manifest.get("parent") or {}).get("path")
        parent = folders.get(str(Path(parent_dir).resolve())) if parent_dir else None
        run_file = run_dir / name / "adapter" / "run.json"
        run = json.loads(run_file.read_text()) if run_file.is_file() else {}
        if manifest.get("dense"):
            kept = "no (dense by design)"
        elif not manifest.get("merged", True) or parent_dir is None or not Path(parent_dir).is_dir():
            kept = "not checked"
        else:
            kept = "yes" if verify_checkpoint(run_dir / name, against=parent_dir)["ok"] else "NO"
        ppl, pruned_ppl = _first_perplexity(evaluations.get(name)), _first_perplexity(evaluations.get(parent))
        recovered = None
        if None not in (ppl, pruned_ppl, dense_ppl) and pruned_ppl != dense_ppl:
            recovered = 100 * (pruned_ppl - ppl) / (pruned_ppl - dense_ppl)
        rows.append({
            "stage": name, "method": manifest.get("method"), "parent": parent,
            "trainable_params": (manifest.get("training") or {}).get("trainable_params"), "zeros_kept": kept,
            "seconds_per_step": run.get("seconds_per_step"), "peak_memory_mb": run.get("peak_memory_mb"),
            "memory_measure": run.get("memory_measure"), "ppl": ppl, "pruned_ppl": pruned_ppl,
            "dense_ppl": dense_ppl, "gap_recovered_percent": recovered,
        })
    return rows


def recovery_table(rows: list[dict]) -> str:
    def show(value, form: str) -> str:
        return format(value, form) if isinstance(value, (int, float)) else "-"

    header = ["stage", "method", "trainable params", "zeros kept (verified)", "s/step", "memory MB", "ppl",
              "% of pruning gap recovered"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([
            row["stage"], str(row["method"]), show(row["trainable_params"], ","), row["zeros_kept"],
            show(row["seconds_per_step"], ".3f"), show(row["peak_memory_mb"], ".2f"), show(row["ppl"], ".3f"),
            show(row["gap_recovered_percent"], ".1f"),
        ]) + " |")
    return "\n".join(lines)


def owl_rows(manifest: dict) -> list[dict]:
    """One row per pruned block of an OWL prune's spp.json: its outlier ratio (percent), OWL sparsity, the uniform
    target, and the measured sparsity of the block's linears (zeros over weights, from the layer records)."""
    profile = manifest["sparsity_profile"]
    zeros: dict[str, float] = {}
    weights: dict[str, int] = {}
    for name, record in manifest.get("layers", {}).items():
        block = name.split("layers.")[-1].split(".", 1)[0] if "layers." in name else None
        if block is not None:
            size = record["shape"][0] * record["shape"][1]
            zeros[block] = zeros.get(block, 0.0) + record["sparsity"] * size
            weights[block] = weights.get(block, 0) + size
    target = manifest["target_sparsity"]
    return [{"block": int(block), "outlier_ratio": profile["outlier_ratio"].get(block),
             "sparsity": sparsity, "target": target, "difference": sparsity - target,
             "measured": zeros[block] / weights[block] if block in weights else None}
            for block, sparsity in sorted(profile["layer_sparsity"].items(), key=lambda item: int(item[0]))]


def owl_section(name: str, manifest: dict, rows: list[dict]) -> str:
    """Markdown: what OWL did, a table of the blocks and a text bar per block (one # per percent of sparsity)."""
    profile = manifest["sparsity_profile"]
    target = manifest["target_sparsity"]
    lines = [f"### {name}: OWL per-block sparsity (M = {profile['threshold']:g}, lambda = {profile['lambda']:g})\n",
             "OWL (outlier-weighted layerwise sparsity) prunes a block less the more outlier features it has: its "
             "outlier ratio is the percent of Wanda-metric entries |W_ij|·‖X_j‖ above M × their mean, and the ratios "
             f"are rescaled to block sparsities spread over 2·lambda = {2 * profile['lambda']:g} whose mean is the "
             f"uniform target {target:g}.\n",
             "| block | outlier ratio (%) | OWL sparsity | uniform target | OWL − target | measured sparsity |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        ratio = "-" if row["outlier_ratio"] is None else f"{row['outlier_ratio']:.4f}"
        measured = "-" if row["measured"] is None else f"{row['measured']:.4f}"
        lines.append(f"| {row['block']} | {ratio} | {row['sparsity']:.4f} | {target:.4f} | "
                     f"{row['difference']:+.4f} | {measured} |")
    lines += ["", "```", f"sparsity per block (#: 1 percent; | marks the uniform target {target:g})"]
    for row in rows:
        bar = "#" * round(100 * row["sparsity"])
        mark = round(100 * target)
        bar = bar[:mark] + "|" + bar[mark:] if len(bar) >= mark else bar + " " * (mark - len(bar)) + "|"
        lines.append(f"block {row['block']:>3} {bar} {row['sparsity']:.4f}")
    lines.append("```")
    return "\n".join(lines)


def plot_owl(name: str, manifest: dict, rows: list[dict], path: Path) -> None:
    """Bars: each block's OWL sparsity; dashed line: the uniform target; dots (right axis): outlier ratio (%)."""
    figure, axis = pyplot().subplots(figsize=(max(6, 0.25 * len(rows)), 3.6))
    blocks = [row["block"] for row in rows]
    axis.bar(blocks, [row["sparsity"] for row in rows], color="#4c72b0", label="OWL sparsity")
    axis.axhline(manifest["target_sparsity"], linestyle="--", color="gray",
                 label=f"uniform target {manifest['target_sparsity']:g}")
    low = min(row["sparsity"] for row in rows)
    axis.set_ylim(max(0.0, low - 0.05), min(1.0, max(row["sparsity"] for row in rows) + 0.05))
    axis.set_xticks(blocks)
    axis.set_xlabel("decoder block")
    axis.set_ylabel("fraction of zero weights")
    handles, labels = axis.get_legend_handles_labels()
    ratios = [(row["block"], row["outlier_ratio"]) for row in rows if row["outlier_ratio"] is not None]
    if ratios:
        right = axis.twinx()
        right.plot([b for b, _ in ratios], [r for _, r in ratios], "o-", color="#c44e52", label="outlier ratio (%)")
        right.set_ylabel("outlier ratio (%)")
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    axis.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8)
    axis.set_title(f"{name}: OWL per-block sparsity")
    figure.tight_layout()
    _save(figure, path)


PLOTS = ("metrics.png", "recovery.png", "recovery_curves.png", "sparsity.png", "loss.png")


def _budget_sections(run_dir: Path, manifests: dict, evaluations: dict, colours: dict) -> list[str]:
    """Recovery against budget: the curves (spp_cli/report_curves.py, recovery_curves.png) and each sweep's pick on
    the held-out split with its test figures over the seeds (spp_cli/report_sweep.py; run.json's "sweeps")."""
    from spp_cli.report_curves import curves_section
    from spp_cli.report_sweep import sweeps_section

    sections = []
    curves = curves_section(manifests, evaluations)
    if curves is not None:
        sections.append(curves[0])
        if _save(curves_figure(curves[1], colours), run_dir / "recovery_curves.png"):
            sections.append("![recovery against training tokens](recovery_curves.png)\n")
    summary_file = run_dir / "run.json"
    sweeps = json.loads(summary_file.read_text()).get("sweeps") if summary_file.is_file() else None
    if sweeps:
        sections.append(sweeps_section(sweeps, manifests, evaluations)[0])
    return sections


def write_report(run_dir: str | Path) -> dict:
    """Write RUN_DIR/report.md and its PNGs; returns their paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BadInput(f"run directory '{run_dir}' does not exist: give the output_dir of a `spp run`")
    manifests, evaluations = read_stages(run_dir)
    if not manifests and not evaluations:
        raise BadInput(f"'{run_dir}' holds no stage output (spp.json or results.json): run `spp run RECIPE` first")
    owl_plots = [f"owl-{name}.png" for name, m in manifests.items()
                 if (m.get("sparsity_profile") or {}).get("profile") == "owl"]
    for name in ["report.md", *PLOTS, *owl_plots]:  # all refused before any is written
        check_replaceable_file(run_dir / name)
    sections = [f"# spp report: {run_dir.name}\n"]
    colours = model_colours([*evaluations, *manifests])  # one colour per model in every plot
    if evaluations:
        sections.append("## Evaluation\n\n" + markdown_table(evaluations, manifests) + "\n")
        notes = {note for entry in evaluations.values() for note in entry.get("notes", [])}
        sections += [f"- note: {note}" for note in sorted(notes)]
        if _save(metrics_figure(evaluations, colours), run_dir / "metrics.png"):
            sections.append("\n![metrics per model](metrics.png)\n")
    rows = recovery_rows(run_dir, manifests, evaluations)
    if len(rows) > 1:
        sections.append("## Recovery\n\n" + recovery_table(rows) + "\n")
        memory = {row["memory_measure"] for row in rows if row["memory_measure"]}
        sections += [f"- memory MB: {measure}" for measure in sorted(memory)]
        if _save(recovery_figure(rows, colours), run_dir / "recovery.png"):
            sections.append("\n![ppl against trainable parameters](recovery.png)\n")
    sections += _budget_sections(run_dir, manifests, evaluations, colours)
    sections.append("## Stages\n")
    for name, manifest in manifests.items():
        parent = (manifest.get("parent") or {}).get("path")
        training = manifest.get("training") or {}
        detail = f", {training.get('steps')} steps" if training else ""
        sparsity = manifest.get("overall_sparsity")
        sparsity_text = f"sparsity {sparsity:.4f}" if isinstance(sparsity, float) else "no merged model"
        dense_text = f" — dense after the {manifest.get('method')} merge" if manifest.get("dense") else ""
        sections.append(
            f"- **{name}** ({manifest.get('stage')}, {manifest.get('method')}, pattern {manifest.get('pattern')}): "
            f"{sparsity_text}{dense_text}{detail}, {manifest.get('seconds', 0):.1f} s; parent `{parent}`; "
            f"manifest `{manifest.get('manifest_sha256', '')[:16]}`"
        )
    if _save(sparsity_figure(manifests, colours), run_dir / "sparsity.png"):
        sections.append("\n![per-layer sparsity](sparsity.png)\n")
    for name, manifest in manifests.items():
        if (manifest.get("sparsity_profile") or {}).get("profile") == "owl":
            rows = owl_rows(manifest)
            sections.append(owl_section(name, manifest, rows))
            plot_owl(name, manifest, rows, run_dir / f"owl-{name}.png")
            sections.append(f"\n![OWL per-block sparsity of {name}](owl-{name}.png)\n")
    if _save(loss_figure(manifests, colours), run_dir / "loss.png"):
        sections.append("## Fine-tuning\n\n![fine-tune loss](loss.png)\n")
    report = run_dir / "report.md"
    write_owned(report, "\n".join(sections) + "\n")
    plots = [run_dir / name for name in [*PLOTS, *owl_plots] if (run_dir / name).is_file()]
    return {"report": str(report), "plots": [str(p) for p in sorted(plots)]}

"""`spp report`'s recovery curves: every fine-tune stage that recorded a curve (`--eval-steps`, spp.json's
training.curve), metric against training tokens, as a table of the points and the data of recovery_curves.png
(spp_cli/plots.py curves_figure draws it). Nothing is recomputed: the points are spp.json's.

References drawn across a panel, where known: "pruned" is the step-0 point, when every curve of the panel starts
at the same value (one parent, one held-out split: each method's adapter starts as the identity); for the ppl,
"dense" and "pruned" are also an evaluated model's figure on the same task, seqlen and windows.
"""

from __future__ import annotations

from pathlib import Path

METRICS = {"held_out_loss": "held-out loss (nats/token)", "ppl": "token perplexity"}


def curve_series(manifests: dict, evaluations: dict) -> dict:
    """{"series": stage -> {"method", "points"}, "panels": [{"metric", "label", "references": {name: value}}]}
    for the fine-tune stages with a curve, in stage order; {"series": {}} when none has one."""
    series = {name: {"method": m.get("method"), "points": m["training"]["curve"],
                     "ppl": m["training"].get("curve_ppl"), "parent": _folder_name(m)}
              for name, m in manifests.items() if (m.get("training") or {}).get("curve")}
    panels = []
    for metric, label in METRICS.items():
        if not any(metric in point for s in series.values() for point in s["points"]):
            continue
        ppl_record = next((s["ppl"] for s in series.values() if s["ppl"]), None)
        if metric == "ppl" and ppl_record is not None:
            label = (f"{short_task(ppl_record['task'])} token ppl\n"
                     f"({ppl_record['windows']} windows @{ppl_record['seqlen']})")
        panels.append({"metric": metric, "label": label,
                       "references": _references(metric, series, evaluations, ppl_record)})
    return {"series": series, "panels": panels}


def short_task(task: str) -> str:
    """A perplexity task short enough for an axis: ppl:/a/long/path/wikitext/valid.jsonl -> ppl:wikitext/valid.jsonl."""
    if task.startswith("ppl:") and "/" in task:
        return "ppl:" + "/".join(Path(task[len("ppl:"):]).parts[-2:])
    return task


def _references(metric: str, series: dict, evaluations: dict, ppl_record: dict | None) -> dict[str, float]:
    references = {}
    if metric == "ppl" and ppl_record is not None:
        for name in ("dense", _parent_name(series, evaluations)):
            value = _matching_perplexity(evaluations.get(name), ppl_record)
            if value is not None:
                references["dense" if name == "dense" else "pruned"] = value
    starts = {point[metric] for s in series.values() for point in s["points"][:1]
              if point["step"] == 0 and point.get(metric) is not None}
    if "pruned" not in references and len(starts) == 1:
        references["pruned"] = starts.pop()
    return references


def _parent_name(series: dict, evaluations: dict) -> str | None:
    """The evaluated model every curve's stage was trained from (a stage of this run), else None."""
    parents = {s["parent"] for s in series.values()}
    parent = parents.pop() if len(parents) == 1 else None
    return parent if parent in evaluations else None


def _folder_name(manifest: dict) -> str | None:
    path = (manifest.get("parent") or {}).get("path")
    return Path(path).name if path else None


def _matching_perplexity(entry: dict | None, record: dict) -> float | None:
    """An evaluation's perplexity on the curve's task, measured the same way (seqlen and windows), else None."""
    measured = ((entry or {}).get("perplexity") or {}).get(record["task"]) or {}
    same = measured.get("seqlen") == record["seqlen"] and measured.get("windows") == record["windows"]
    return measured.get("value") if same else None


def curves_table(data: dict) -> str:
    """Markdown: one row per point of every curve."""
    metrics = [panel["metric"] for panel in data["panels"]]
    header = ["stage", "method", "step", "training tokens", *(METRICS[m] for m in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, series in data["series"].items():
        for point in series["points"]:
            values = [f"{point[m]:.4f}" if isinstance(point.get(m), float) else "-" for m in metrics]
            lines.append("| " + " | ".join([name, str(series["method"]), str(point["step"]),
                                            str(point["train_tokens"]), *values]) + " |")
    return "\n".join(lines)


def curves_section(manifests: dict, evaluations: dict) -> tuple[str, dict] | None:
    """(report.md's section, the figure's data) or None when no stage recorded a curve."""
    data = curve_series(manifests, evaluations)
    if not data["series"]:
        return None
    references = "; ".join(f"{panel['label']}: " + ", ".join(f"{k} {v:.4f}" for k, v in panel["references"].items())
                           for panel in data["panels"] if panel["references"])
    text = ("## Recovery curves\n\nEach fine-tune's held-out figures along its training (`--eval-steps`), against "
            "the tokens it trained on (non-padding).\n\n" + curves_table(data) + "\n"
            + (f"\n- references: {references}\n" if references else ""))
    return text, data

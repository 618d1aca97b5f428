"""The figures of `spp report` (spp_cli/report.py saves them): data in, a matplotlib Figure out, nothing written, so
a test can inspect axis limits, colours and markers before anything is saved. matplotlib on its file-only Agg
backend (no display), imported inside the functions.

Every model or stage keeps one colour in every figure (`model_colours`); a curve of few points draws each point;
an axis never zooms in so far that rounding noise looks like a signal.
"""

from __future__ import annotations

from typing import Any

FEW_POINTS = 30  # a curve with fewer points marks each one: two logged steps read as two measurements, not a trend
SPARSITY_MARGIN = 0.05  # the sparsity axis spans at least the target ± this (Wanda's 0.6953-0.6989 is not a spike)
INCHES_PER_CHARACTER = 0.085  # of an 8-point tick label: a bar's slot holds the longest model name


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def model_colours(names: list[str]) -> dict[str, Any]:
    """name -> an RGB(A) colour, one distinct colour per distinct name in order: tab10, tab20 beyond 10 names,
    evenly spaced along turbo beyond 20."""
    from matplotlib import colormaps

    unique = list(dict.fromkeys(names))
    if len(unique) <= 20:
        palette = colormaps["tab10" if len(unique) <= 10 else "tab20"].colors
    else:
        palette = [colormaps["turbo"](index / (len(unique) - 1)) for index in range(len(unique))]
    return {name: palette[index] for index, name in enumerate(unique)}


def metrics_figure(evaluations: dict, colours: dict[str, Any]):
    """One bar chart per metric (up to 3 a row), one bar per model in its colour, each bar's value above it (a
    missing value is an empty slot marked "-"). None when no model has a metric beside mean_acc_7."""
    from spp_cli.render import metric_columns, metric_value

    columns = [c for c in metric_columns(evaluations) if c[1] != "mean_acc_7"]
    if not columns:
        return None
    plt = pyplot()
    names = list(evaluations)
    # horizontal tick labels while each bar's slot can hold the longest name in a panel of at most 6 inches, else
    # vertical ones (rotated by less, long names still collide)
    slot = max(0.6, INCHES_PER_CHARACTER * max(len(name) for name in names))
    upright = len(names) * slot > 6
    panel_width = max(3.2, len(names) * (0.3 if upright else slot) + 0.8)
    per_row = max(1, min(3, len(columns), int(13 // panel_width)))
    rows = -(-len(columns) // per_row)
    height = 3.2 + (0.07 * max(len(name) for name in names) if upright else 0)
    figure, axes = plt.subplots(rows, per_row, figsize=(panel_width * per_row, height * rows), squeeze=False)
    for axis in axes.flat[len(columns):]:
        axis.set_visible(False)
    for axis, (title, section, key) in zip(axes.flat, columns, strict=False):
        texts = [metric_value(evaluations[name], section, key) for name in names]
        values = [float(text) if text != "-" else 0.0 for text in texts]  # a missing value: no bar, "-"
        bars = axis.bar(names, values, color=[colours[name] for name in names])
        labels = [text if text == "-" else format(float(text), ".4g") for text in texts]
        axis.bar_label(bars, labels=labels, padding=2, fontsize=8, rotation=90 if upright else 0)
        headroom = 1.3 if upright else 1.15  # room for the value labels inside the frame
        axis.set_ylim(0, headroom * max(values) if max(values) > 0 else 1)
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", labelsize=8, labelrotation=90 if upright else 0)
    figure.tight_layout()
    return figure


def sparsity_figure(manifests: dict, colours: dict[str, Any]):
    """Per-layer sparsity of every stage with layer records, each stage its colour and marker (a fine-tune keeps
    its prune's zeros, so the lines coincide), the target as a dashed line; the y axis spans at least
    target ± SPARSITY_MARGIN. None when no stage has layers."""
    stages = {name: m for name, m in manifests.items() if m.get("layers")}
    if not stages:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(6, 0.12 * max(len(m["layers"]) for m in stages.values())), 3.6))
    markers = ["o", "x", "+", "^", "s", "v", "D"]
    values: list[float] = []
    labels: list[str] = []
    for index, (name, manifest) in enumerate(stages.items()):
        layers = manifest["layers"]
        sparsities = [record["sparsity"] for record in layers.values()]
        values += sparsities
        axis.plot(range(len(layers)), sparsities, marker=markers[index % len(markers)], markersize=8 - index % 4,
                  linestyle="-" if index == 0 else "--", color=colours[name], label=name)
        if len(layers) > len(labels):
            labels = [n.split("layers.")[-1] if "layers." in n else n for n in layers]
    targets = sorted({m["target_sparsity"] for m in stages.values() if isinstance(m.get("target_sparsity"), float)})
    for target in targets:
        axis.axhline(target, linestyle=":", color="gray", label=f"target {target:g}")
    centre = targets or values
    low, high = min(values + centre) - SPARSITY_MARGIN, max(values + centre) + SPARSITY_MARGIN
    axis.set_ylim(max(0.0, low), min(1.0, high))
    axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    axis.set_ylabel("fraction of zero weights")
    axis.set_title("per-layer sparsity of the pruned linears")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def loss_figure(manifests: dict, colours: dict[str, Any]):
    """The training loss of every fine-tune stage in its colour (each point marked when the curve has fewer than
    FEW_POINTS), its held-out loss at the end dashed. None when no stage logged a loss."""
    curves = {
        n: m["training"]["loss_curve"] for n, m in manifests.items() if (m.get("training") or {}).get("loss_curve")
    }
    if not curves:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for name, curve in curves.items():
        axis.plot([p["step"] for p in curve], [p["loss"] for p in curve], color=colours[name],
                  marker="o" if len(curve) < FEW_POINTS else None, markersize=4, label=f"{name} train loss")
        eval_loss = manifests[name]["training"].get("eval_loss")
        if isinstance(eval_loss, float):
            axis.axhline(eval_loss, linestyle="--", color=colours[name], label=f"{name} held-out loss (end)")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.set_title("fine-tune loss")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def recovery_figure(rows: list[dict], colours: dict[str, Any]):
    """ppl against trainable parameters (log x), one point per fine-tune stage in its colour, labelled with its
    method on the side away from the dense and pruned lines; the legend below the axes. None without points."""
    points = [r for r in rows if isinstance(r["ppl"], float) and r["trainable_params"]]
    if not points:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4.2))
    for row in points:
        axis.scatter(row["trainable_params"], row["ppl"], s=40, color=colours[row["stage"]], zorder=3)
    lines = []
    for key, label, style in (("dense_ppl", "dense", "-"), ("pruned_ppl", "pruned", "--")):
        value = points[0][key]
        if isinstance(value, float):
            axis.axhline(value, linestyle=style, color="gray", label=f"{label} ({value:.3f})")
            lines.append(value)
    axis.set_xscale("log")
    axis.margins(x=0.15, y=0.12)
    axis.set_xlabel("trainable parameters")
    axis.set_ylabel("token perplexity")
    axis.set_title("recovery per method")
    if lines:  # no dense or pruned level known: nothing to put in a legend
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)
    figure.tight_layout()
    for row in points:  # after the layout: the offsets are measured in the final axes
        xytext, horizontal, vertical = _label_place(axis, row["trainable_params"], row["ppl"], lines)
        axis.annotate(row["method"], (row["trainable_params"], row["ppl"]), textcoords="offset points",
                      xytext=xytext, ha=horizontal, va=vertical, fontsize=9)
    return figure


LABEL_OFFSET, LABEL_HEIGHT = 6, 12  # points: a method's label starts 6 above (or below) its point, 9-point text


def _label_place(axis, x: float, y: float, lines: list[float]) -> tuple[tuple[int, int], str, str]:
    """(offset in points, ha, va) of a point's label: right of the point (left of it in the axes' right third, so
    it stays inside the figure); above it unless a horizontal line runs through the label there, then below (above
    when lines would cross it on both sides)."""
    to_points = 72 / axis.figure.dpi
    point_x, point_y = axis.transData.transform((x, y))
    heights = [(axis.transData.transform((x, line))[1] - point_y) * to_points for line in lines]

    def crossed(side: int) -> bool:
        return any(LABEL_OFFSET - 2 <= side * height <= LABEL_OFFSET + LABEL_HEIGHT + 2 for height in heights)

    side = -1 if crossed(1) and not crossed(-1) else 1
    right_third = axis.transAxes.inverted().transform((point_x, point_y))[0] > 2 / 3
    return ((-5 if right_third else 5, LABEL_OFFSET * side), "right" if right_third else "left",
            "bottom" if side > 0 else "top")


def curves_figure(data: dict, colours: dict[str, Any]):
    """Recovery against budget (spp_cli/report_curves.py's data): one panel per metric (held-out loss, ppl), the
    metric against training tokens, one line per fine-tune stage in its colour, labelled with its stage and
    method, each point marked; the references (pruned, dense) as gray horizontal lines. None without a curve."""
    if not data["series"]:
        return None
    plt = pyplot()
    panels = data["panels"]
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for axis, panel in zip(axes[0], panels, strict=True):
        metric = panel["metric"]
        for name, series in data["series"].items():
            points = [p for p in series["points"] if p.get(metric) is not None]
            axis.plot([p["train_tokens"] for p in points], [p[metric] for p in points], color=colours[name],
                      marker="o" if len(points) < FEW_POINTS else None, markersize=4,
                      label=f"{name} ({series['method']})")
        for label, value in panel["references"].items():  # as in recovery_figure: dense solid, pruned dashed
            axis.axhline(value, linestyle="-" if label == "dense" else "--", color="gray",
                         label=f"{label} ({value:.4g})")
        axis.set_xlabel("training tokens (non-padding)")
        axis.set_ylabel(panel["label"])
        axis.set_title(f"recovery against budget: {panel['metric'].replace('_', ' ')}")
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    figure.tight_layout()
    return figure

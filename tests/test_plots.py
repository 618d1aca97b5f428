"""The report's figures (spp_cli/plots.py), inspected as matplotlib objects before anything is saved: the sparsity
axis is not a zoom into rounding noise, every model has its own colour, labels do not overlap, short loss curves
mark their points, and the recovery plot's labels stay off the dense and pruned lines."""

import itertools

import pytest
from matplotlib.colors import to_hex
from report_fixtures import PPL_TASK, evaluation, loss_curve, manifest

from spp_cli.plots import (
    FEW_POINTS,
    loss_figure,
    metrics_figure,
    model_colours,
    pyplot,
    recovery_figure,
    sparsity_figure,
)


@pytest.fixture
def figures():
    """Collects the figures a test makes and closes them after it."""
    made = []
    yield made.append
    for figure in made:
        pyplot().close(figure)


def _boxes(figure, texts):
    renderer = figure.canvas.get_renderer()
    return [(text.get_text(), text.get_window_extent(renderer)) for text in texts if text.get_text()]


def _assert_apart(boxes):
    for (first, a), (second, b) in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), f"{first!r} overlaps {second!r}"


def test_sparsity_axis_spans_the_target_and_a_margin(figures):
    """Wanda 70% on the tiny model gives 0.6953 and 0.6989 per layer: the axis was 0.6951-0.6991, which drew that
    difference as spikes; it must span the target ± 0.05 and show the target."""
    manifests = {"prune": manifest("prune", "wanda", "dense", 0.7), "finetune": manifest("finetune", "spp", "p", 0.7)}
    colours = model_colours(list(manifests))
    figure = sparsity_figure(manifests, colours)
    figures(figure)
    axis = figure.axes[0]
    low, high = axis.get_ylim()
    assert low <= 0.65 and high >= 0.75
    target = [line for line in axis.get_lines() if list(line.get_ydata()) == [0.7, 0.7]]
    assert len(target) == 1 and target[0].get_label() == "target 0.7"
    stage_lines = {line.get_label(): line for line in axis.get_lines() if line.get_label() in manifests}
    assert {name: to_hex(line.get_color()) for name, line in stage_lines.items()} == {
        name: to_hex(colours[name]) for name in manifests}
    # the fine-tune keeps the prune's zeros: same values, so each needs its own marker to be seen
    assert stage_lines["prune"].get_marker() != stage_lines["finetune"].get_marker()
    # far from the target the axis still reaches the data, within [0, 1]
    sparse = {"prune": manifest("prune", "magnitude", "dense", 0.95)}
    sparse["prune"]["layers"]["model.layers.0.mlp.up_proj"]["sparsity"] = 0.5
    figure = sparsity_figure(sparse, model_colours(["prune"]))
    figures(figure)
    assert figure.axes[0].get_ylim() == pytest.approx((0.45, 1.0))


@pytest.mark.parametrize("names", [
    ["dense", "prune", "finetune"],  # the quickstart: upright labels
    ["dense", "prune", "spp", "lora", "masked-lora", "masked-full", "ia3", "spp-g4", "spp-g64", "lora-r64",
     "masked-lora-r64-long-name", "ia3-all"],  # a sweep: beyond tab10, labels turned on their side
])
def test_metrics_colour_each_model_once_and_labels_do_not_overlap(names, figures):
    evaluations = {name: evaluation(60.0 + index, 0.7, boolq=0.6 + index / 100, piqa=0.6)
                   for index, name in enumerate(names)}
    evaluations[names[-1]]["results"].pop("piqa")  # a missing value is an empty slot marked "-"
    colours = model_colours(names)
    figure = metrics_figure(evaluations, colours)
    figures(figure)
    figure.canvas.draw()
    panels = [axis for axis in figure.axes if axis.get_visible()]
    assert [axis.get_title() for axis in panels] == ["python-docs:test token ppl @256", "boolq acc", "piqa acc"]
    for axis in panels:
        bars = axis.patches
        assert [to_hex(bar.get_facecolor()) for bar in bars] == [to_hex(colours[name]) for name in names]
        assert len({to_hex(bar.get_facecolor()) for bar in bars}) == len(names)
        value_labels = list(axis.texts)  # bar_label's, one a bar
        assert len(value_labels) == len(names)
        _assert_apart(_boxes(figure, axis.get_xticklabels()))
        _assert_apart(_boxes(figure, value_labels))
        frame = axis.get_window_extent()
        for label, box in _boxes(figure, value_labels):
            assert box.y1 <= frame.y1, f"value label {label!r} runs over the top of the frame"
    assert panels[2].texts[-1].get_text() == "-"
    assert panels[0].texts[0].get_text() == "60"


def test_model_colours_stay_distinct_past_the_palettes():
    for count in (3, 10, 11, 20, 25):
        colours = model_colours([f"m{i}" for i in range(count)] + ["m0"])  # a repeated name keeps its colour
        assert len(colours) == count and len({to_hex(c) for c in colours.values()}) == count


def test_short_loss_curves_mark_each_point(figures):
    """Two logged steps drew a straight line that read as a trend; below FEW_POINTS points each point is marked."""
    lengths = {"two": 2, "quickstart": 12, "long": FEW_POINTS}
    manifests = {name: {"training": {"loss_curve": loss_curve(10 * count), "eval_loss": 3.05}}
                 for name, count in lengths.items()}
    colours = model_colours(list(manifests))
    figure = loss_figure(manifests, colours)
    figures(figure)
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    for name, count in lengths.items():
        train = lines[f"{name} train loss"]
        assert len(train.get_xdata()) == count
        assert train.get_marker() == ("o" if count < FEW_POINTS else "None")
        assert to_hex(train.get_color()) == to_hex(colours[name])
        held_out = lines[f"{name} held-out loss (end)"]
        assert to_hex(held_out.get_color()) == to_hex(colours[name])  # not one gray for every stage


def _recovery_row(stage: str, params: int, ppl: float) -> dict:
    return {"stage": stage, "method": stage, "trainable_params": params, "ppl": ppl,
            "dense_ppl": 67.034, "pruned_ppl": 123.7042}


@pytest.mark.parametrize("ppl", [123.7042, 123.6, 121.5, 125.0, 67.1, 70.0])
def test_recovery_labels_stay_off_the_lines(ppl, figures):
    """The "spp" label sat on the pruned line: each label goes to the side of its point that no line crosses."""
    rows = [_recovery_row("spp", 10_000, ppl), _recovery_row("lora", 100_000, 95.0),
            _recovery_row("masked-lora", 1_000_000, 67.034)]
    colours = model_colours([row["stage"] for row in rows])
    figure = recovery_figure(rows, colours)
    figures(figure)
    figure.canvas.draw()
    axis = figure.axes[0]
    labels = _boxes(figure, axis.texts)
    assert [label for label, _ in labels] == ["spp", "lora", "masked-lora"]
    _assert_apart(labels)
    lines = [axis.transData.transform((1, value))[1] for value in (67.034, 123.7042)]
    for label, box in labels:
        assert figure.bbox.x0 <= box.x0 and box.x1 <= figure.bbox.x1, f"the {label!r} label leaves the figure"
        for y in lines:
            assert not box.y0 <= y <= box.y1, f"the {label!r} label is crossed by a line"
    points = [to_hex(collection.get_facecolor()[0]) for collection in axis.collections]
    assert points == [to_hex(colours[row["stage"]]) for row in rows]


def test_nothing_to_plot_is_none():
    assert metrics_figure({"dense": {"model": {}}}, {}) is None
    assert sparsity_figure({"dense": {}}, {}) is None
    assert loss_figure({"prune": {"layers": {}}}, {}) is None
    assert recovery_figure([{**_recovery_row("spp", 0, 80.0)}], {}) is None
    assert PPL_TASK in evaluation(1.0, None)["perplexity"]

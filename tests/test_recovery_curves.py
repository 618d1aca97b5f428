"""Recovery against budget (issue 24, item 3): the fine-tune's curve (--eval-steps, training/curve.py), `spp report`'s
recovery_curves.png and its table (report_curves.py, the data given to matplotlib equals spp.json's curves), and a
recipe sweep's pick on the held-out split with mean ± half-range test figures (recipe/sweep.py, report_sweep.py)."""

import json

import pytest
import yaml
from safetensors.torch import load_file
from tiny_models import ALPACA, save_random_model

from spp_cli.pipeline import run_recipe
from spp_cli.report import write_report
from spp_cli.stages.finetune import finetune
from spp_cli.stages.prune import prune

PPL = "ppl:builtin:python-docs:test"
TINY = dict(data=str(ALPACA), max_steps=3, batch_size=4, micro_batch_size=4, seqlen=32, val_size=8, device="cpu")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("curves")
    save_random_model(root / "dense")
    prune(str(root / "dense"), root / "prune", method="magnitude", sparsity=0.5, device="cpu")
    return root / "prune"


@pytest.fixture(scope="module")
def curve_runs(pruned):
    """The same fine-tune with a curve (every 2 steps, a ppl on 2 windows) and without: (manifests, notes)."""
    notes = []
    with_curve = finetune(str(pruned), pruned.parent / "curve", eval_steps=2, eval_ppl_source=PPL,
                          eval_ppl_windows=2, on_event=lambda e: notes.append(e.payload) if e.kind == "note" else 0,
                          **TINY)
    plain = finetune(str(pruned), pruned.parent / "plain", **TINY)
    return with_curve, plain, notes


def test_the_curve_has_a_point_at_the_start_every_n_steps_and_the_end(curve_runs):
    manifest, _, notes = curve_runs
    curve = manifest["training"]["curve"]
    assert [p["step"] for p in curve] == [0, 2, 3]
    assert [p["train_tokens"] for p in curve] == [0, 256, 384]  # 4 packed windows of 32 tokens a step
    assert curve[-1]["held_out_loss"] == manifest["training"]["eval_loss"]
    assert all(isinstance(p["ppl"], float) for p in curve)
    assert manifest["training"]["curve_ppl"] == {"task": PPL, "source": "builtin:python-docs:test", "seqlen": 32,
                                                 "windows": 2, "protocol": "token, non-overlapping windows"}
    assert manifest["config"]["eval_steps"] == 2 and manifest["config"]["eval_ppl_windows"] == 2
    shown = [note for note in notes if note.startswith("curve: ")]
    assert len(shown) == 3 and shown[1].startswith("curve: step 2, 256 tokens trained: held-out loss ")


def test_measuring_the_curve_leaves_training_and_the_default_manifest_unchanged(curve_runs, pruned):
    manifest, plain, _ = curve_runs
    assert "curve" not in plain["training"] and "curve_ppl" not in plain["training"]
    assert not any(key.startswith("eval_") for key in plain["config"])  # default fingerprints as before
    trained = load_file(pruned.parent / "curve" / "adapter" / "adapter_model.safetensors")
    untouched = load_file(pruned.parent / "plain" / "adapter" / "adapter_model.safetensors")
    assert all(trained[key].equal(untouched[key]) for key in untouched)  # evaluations draw no training randomness
    assert manifest["layers"] == plain["layers"]


def test_report_draws_the_curves_from_spp_json(curve_runs, pruned, monkeypatch):
    run = pruned.parent
    drawn = {}
    import spp_cli.report as report

    original = report.curves_figure

    def recording(data, colours):  # the data handed to matplotlib
        drawn["data"] = data
        return original(data, colours)

    monkeypatch.setattr(report, "curves_figure", recording)
    written = write_report(run)
    assert (run / "recovery_curves.png").is_file() and str(run / "recovery_curves.png") in written["plots"]
    stored = json.loads((run / "curve" / "spp.json").read_text())["training"]["curve"]
    assert drawn["data"]["series"]["curve"]["points"] == stored and list(drawn["data"]["series"]) == ["curve"]
    assert [panel["metric"] for panel in drawn["data"]["panels"]] == ["held_out_loss", "ppl"]
    assert drawn["data"]["panels"][0]["references"] == {"pruned": stored[0]["held_out_loss"]}  # the step-0 point
    section = (run / "report.md").read_text().split("## Recovery curves")[1].split("\n## ")[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| curve | spp | ")]
    assert [(int(r[2]), int(r[3]), float(r[4]), float(r[5].rstrip(" |"))) for r in rows] == [
        (p["step"], p["train_tokens"], round(p["held_out_loss"], 4), round(p["ppl"], 4)) for p in stored]


def test_a_sweep_picks_on_the_held_out_loss_and_reports_mean_and_spread(pruned, tmp_path):
    recipe = {"model": str(pruned.parent / "dense"), "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "prune", "type": "prune", "method": "magnitude", "sparsity": 0.5},
        {"name": "spp", "type": "finetune", **{k: v for k, v in TINY.items() if k != "device"}, "max_steps": 2,
         "sweep": {"lr": [1e-3, 3e-2], "seed": [0, 1]}},
        {"name": "eval", "type": "eval", "models": ["spp"], "tasks": [PPL], "seqlen": 32, "limit": 2}]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(recipe))
    summary = run_recipe(tmp_path / "sweep.yaml", [])
    names = [stage["name"] for stage in summary["stages"]]
    assert names == ["prune", "spp-lr1e-3-seed0", "spp-lr1e-3-seed1", "spp-lr3e-2-seed0", "spp-lr3e-2-seed1", "eval"]
    run = tmp_path / "run"
    loss = {name: json.loads((run / name / "spp.json").read_text())["training"]["eval_loss"] for name in names[1:5]}
    means = {lr: (loss[f"spp-lr{lr}-seed0"] + loss[f"spp-lr{lr}-seed1"]) / 2 for lr in ("1e-3", "3e-2")}
    best = min(means, key=means.get)
    ppl = {name: entry["perplexity"][PPL]["value"] for name, entry in summary["evaluation"].items()}
    low, high = sorted([ppl[f"spp-lr{best}-seed0"], ppl[f"spp-lr{best}-seed1"]])

    from spp_cli.report import read_stages
    from spp_cli.report_sweep import sweeps_section

    manifests, evaluations = read_stages(run)
    _, picks = sweeps_section(json.loads((run / "run.json").read_text())["sweeps"], manifests, evaluations)
    chosen = picks["spp"]["chosen"]
    assert chosen["values"] == {"lr": float(best)} and chosen["mean_held_out_loss"] == pytest.approx(means[best])
    (title, figure), = picks["spp"]["test"].items()  # the one test metric: the ppl
    assert title.endswith("token ppl @32") and figure["values"] in ([low, high], [high, low])
    assert figure["mean"] == pytest.approx((low + high) / 2) and figure["spread"] == pytest.approx((high - low) / 2)
    text = (run / "report.md").read_text()
    assert f"{(low + high) / 2:.4f} ± {(high - low) / 2:.4f}" in text

"""What each stage records beside what it was asked: spp.json's and results.json's "applied" (left out of the
manifest hash), and a fine-tune's console lines, loss curve and timings agreeing with each other."""

import json

import pytest
from rich.console import Console
from tiny_models import ALPACA, save_random_model

from spp_cli.io.checkpoint import manifest_sha256
from spp_cli.render import event_printer, render_finetune
from spp_cli.stages.evaluate import evaluate_models
from spp_cli.stages.finetune import finetune
from spp_cli.stages.merge import merge_adapter
from spp_cli.stages.prune import prune

TINY = dict(data=str(ALPACA), batch_size=4, micro_batch_size=4, seqlen=32, val_size=0, device="cpu")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    save_random_model(root / "dense")
    prune(str(root / "dense"), root / "pruned", method="wanda", sparsity=0.5, calib=str(ALPACA), nsamples=2,
          seqlen=32, device="cpu")
    return root / "pruned"


def test_prune_records_the_device_dtypes_and_seqlen_it_applied_outside_the_hash(pruned):
    manifest = json.loads((pruned / "spp.json").read_text())
    assert manifest["applied"] == {"device": "cpu", "dtype": {"compute": "float32", "stored": "float32"},
                                   "seqlen": 32}
    # another machine's device or dtypes do not change the hash: the same run, the same manifest_sha256
    elsewhere = {**manifest, "applied": {"device": "cuda:0", "dtype": {"compute": "bfloat16", "stored": "float32"}}}
    assert manifest_sha256(elsewhere) == manifest_sha256(manifest) == manifest["manifest_sha256"]


def test_finetune_on_alpaca_records_the_format_and_template_it_applied_not_auto(pruned, tmp_path):
    manifest = finetune(str(pruned), tmp_path / "out", method="spp", max_steps=1, **TINY)
    assert manifest["config"]["data_format"] == "auto" and manifest["config"]["lr"] == 4e-3  # what was asked
    records = len(json.loads(ALPACA.read_text()))
    assert manifest["applied"] == {
        "device": "cpu", "dtype": {"compute": "float32", "stored": "float32"}, "data_format": "alpaca",
        "template": "alpaca", "records": {"alpaca": records}, "seqlen": 32, "lr": 4e-3}
    assert json.loads((tmp_path / "out" / "spp.json").read_text())["applied"] == manifest["applied"]
    # merge (spp merge of a --no-merge adapter) records its own device and dtypes, and what the fine-tune applied
    finetune(str(pruned), tmp_path / "adapter-only", method="spp", max_steps=1, no_merge=True,
             **{**TINY, "data": "builtin:python-docs:train", "lr": 1e-3})
    adapter_only = json.loads((tmp_path / "adapter-only" / "spp.json").read_text())["applied"]
    assert (adapter_only["data_format"], adapter_only["template"], adapter_only["lr"]) == ("text", None, 1e-3)
    merged = merge_adapter(tmp_path / "adapter-only" / "adapter", tmp_path / "merged")
    assert merged["applied"] == {"device": "cpu", "dtype": {"compute": "float32", "stored": "float32"},
                                 "finetune": adapter_only}


def test_eval_records_what_it_applied_per_model(pruned, tmp_path):
    evaluate_models({"pruned": str(pruned)}, [f"ppl:{ALPACA}"], tmp_path / "results.json", seqlen=32, limit=2,
                    device="cpu")
    entry = json.loads((tmp_path / "results.json").read_text())["models"]["pruned"]
    assert entry["config"]["dtype"] == "auto"
    assert entry["applied"] == {"device": "cpu", "dtype": {"compute": "float32", "stored": "float32"}, "seqlen": 32}


def run_with_console(pruned, out, **options) -> tuple[dict, list[str]]:
    console = Console(record=True, width=300)
    manifest = finetune(str(pruned), out, method="spp", on_event=event_printer(console), **{**TINY, **options})
    return manifest, console.export_text().splitlines()


def test_each_console_step_line_shows_the_loss_and_lr_the_curve_records_for_that_step(pruned, tmp_path):
    manifest, lines = run_with_console(pruned, tmp_path / "out", max_steps=5, logging_steps=2, lr=1e-2)
    curve = manifest["training"]["loss_curve"]
    assert [point["step"] for point in curve] == [1, 2, 4, 5]  # every 2 steps, and the last step always
    printed = {int(line.split()[1].split("/")[0]): line for line in lines if line.startswith("  step ")}
    assert sorted(printed) == [1, 2, 4, 5]  # a line for each logged step (about 10 a run: here every one)
    for point in curve:
        line = printed[point["step"]]
        assert f"train loss {point['loss']:.4f} " in line and f"lr {point['lr']:.3g}," in line


def test_a_run_shorter_than_the_logging_interval_still_ends_on_its_last_loss(pruned, tmp_path):
    manifest, lines = run_with_console(pruned, tmp_path / "out", max_steps=3, logging_steps=10)
    curve = manifest["training"]["loss_curve"]
    assert [point["step"] for point in curve] == [1, 3]
    last_line = next(line for line in lines if line.startswith("  step 3/3"))
    assert f"train loss {curve[-1]['loss']:.4f} " in last_line
    console = Console(record=True, width=300)
    render_finetune(console, manifest, "out")
    assert f"train loss {curve[0]['loss']:.4f} -> {curve[-1]['loss']:.4f}," in console.export_text()


def test_one_logged_point_reads_as_one_value():
    console = Console(record=True, width=300)
    manifest = {"method": "spp", "seconds": 1.0, "overall_sparsity": 0.5,
                "training": {"steps": 1, "loss_curve": [{"step": 1, "loss": 5.8488, "lr": 0.004}]}}
    render_finetune(console, manifest, "out")
    assert console.export_text().splitlines()[0] == "spp fine-tune: 1 steps, train loss 5.8488, 1.0 s -> out"


def test_seconds_per_step_is_training_time_and_the_held_out_evaluation_is_timed_apart(pruned, tmp_path, monkeypatch):
    """5.24 s a step for ~0.7 s steps: the held-out evaluation after the last step was counted as training."""
    import time

    import transformers

    evaluate = transformers.Trainer.evaluate

    pause = 5.0  # longer than the 2 steps take even on a loaded 2-core machine (3.0 s seen at load 7)

    def slow_evaluate(self, *args, **kwargs):
        time.sleep(pause)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "evaluate", slow_evaluate)
    manifest = finetune(str(pruned), tmp_path / "out", method="spp", max_steps=2, **{**TINY, "val_size": 4})
    run = manifest["run"]
    assert run["eval_seconds"] >= pause and run["train_seconds"] < pause
    assert run["seconds_per_step"] == pytest.approx(run["train_seconds"] / 2, abs=1e-3)
    assert isinstance(manifest["training"]["eval_loss"], float)

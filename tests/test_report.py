"""`spp report` on a comparison run: the recovery table (zeros verified, % of the pruning gap) and its plot."""

import json

from tiny_models import ALPACA, save_random_model

from spp_cli.report import recovery_rows, write_report
from spp_cli.stages.evaluate import evaluate_models
from spp_cli.stages.finetune import finetune
from spp_cli.stages.prune import prune

TINY = dict(data=str(ALPACA), max_steps=3, batch_size=4, micro_batch_size=4, seqlen=32, val_size=0, device="cpu",
            lr=1e-2)


def test_recovery_table_of_a_comparison_run(tmp_path):
    run = tmp_path / "run"
    save_random_model(tmp_path / "dense")
    prune(str(tmp_path / "dense"), run / "prune", method="magnitude", sparsity=0.5, device="cpu")
    for method in ("spp", "lora", "masked-full"):
        finetune(str(run / "prune"), run / method, method=method, **TINY)
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 8}) + "\n"
                            for _ in range(8)))
    models = {"dense": str(tmp_path / "dense"), **{name: str(run / name) for name in ("prune", "spp", "lora",
                                                                                       "masked-full")}}
    evaluate_models(models, [f"ppl:{text}"], run / "eval" / "results.json", seqlen=32, device="cpu")

    from spp_cli.report import read_stages

    rows = {row["method"]: row for row in recovery_rows(run, *read_stages(run))}
    assert sorted(rows) == ["lora", "masked-full", "spp"]  # folder order without a run.json summary
    assert [rows[m]["zeros_kept"] for m in ("spp", "lora", "masked-full")] == ["yes", "no (dense by design)", "yes"]
    assert rows["masked-full"]["trainable_params"] == 2 * (4 * 64 * 64 + 3 * 64 * 128)
    for row in rows.values():
        assert row["parent"] == "prune" and row["seconds_per_step"] > 0 and row["peak_memory_mb"] > 0
        expected = 100 * (row["pruned_ppl"] - row["ppl"]) / (row["pruned_ppl"] - row["dense_ppl"])
        assert abs(row["gap_recovered_percent"] - expected) < 1e-9
    # on a CPU: the training state, fp32 parameter + gradient + AdamW's two moments (16 bytes a trainable
    # parameter) and AdamW's step counter (4 bytes a tensor): masked-full trains 14 full weights
    state_bytes = 16 * rows["masked-full"]["trainable_params"] + 4 * 14
    assert abs(rows["masked-full"]["peak_memory_mb"] - state_bytes / 2**20) < 1e-3

    written = write_report(run)
    report = (run / "report.md").read_text()
    assert "## Recovery" in report and "| masked-full | masked-full | 81,920 | yes |" in report
    assert str(run / "recovery.png") in written["plots"]


def test_owl_prune_reports_each_block_sparsity_against_the_target(tmp_path):
    run = tmp_path / "run"
    prune("builtin:tiny-llama", run / "prune", method="wanda", sparsity=0.6, sparsity_profile="owl",
          calib="builtin:python-docs:train", nsamples=4, seqlen=32, device="cpu")
    manifest = json.loads((run / "prune" / "spp.json").read_text())
    profile = manifest["sparsity_profile"]

    written = write_report(run)
    report = (run / "report.md").read_text()
    assert "### prune: OWL per-block sparsity (M = 5, lambda = 0.08)" in report
    assert "whose mean is the uniform target 0.6" in report
    for block in range(4):  # the tiny model's 4 blocks, each row from spp.json's values
        sparsity, ratio = profile["layer_sparsity"][str(block)], profile["outlier_ratio"][str(block)]
        layers = {n: r for n, r in manifest["layers"].items() if n.startswith(f"model.layers.{block}.")}
        size = {n: r["shape"][0] * r["shape"][1] for n, r in layers.items()}
        measured = sum(r["sparsity"] * size[n] for n, r in layers.items()) / sum(size.values())
        row = (f"| {block} | {ratio:.4f} | {sparsity:.4f} | 0.6000 | {sparsity - 0.6:+.4f} | {measured:.4f} |")
        assert row in report, row
        width = round(100 * sparsity)  # one # per percent, the target marked by | at 60
        bar = "#" * 60 + "|" + "#" * (width - 60) if width >= 60 else "#" * width + " " * (60 - width) + "|"
        assert f"block {block:>3} {bar} {sparsity:.4f}" in report
        # Wanda keeps int(in_features * s) zeros per row: the measured block sparsity is at most 1/128 below
        assert 0 <= sparsity - measured < 1 / 128
    assert str(run / "owl-prune.png") in written["plots"]
    uniform = tmp_path / "uniform"
    prune("builtin:tiny-llama", uniform / "prune", method="magnitude", sparsity=0.6, device="cpu")
    write_report(uniform)
    assert "OWL" not in (uniform / "report.md").read_text()

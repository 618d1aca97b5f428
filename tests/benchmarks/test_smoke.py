"""Every benchmark's --smoke, run in this process (their workers in child processes), and the JSON each writes.

The benchmarks are not timed here: these runs only keep them working (imports, worker command lines, report
layout) and check that their numbers are sane. The llm-compressor peer is used only where its venv exists.
"""

import json
import os

import pytest
import torch

from benchmarks import eval as eval_benchmark
from benchmarks import finetune, matmul, prune, prune_dtype, prune_memory, prune_overlap, prune_owl, real_model


@pytest.fixture(autouse=True)
def restore_process_state(monkeypatch, test_data):
    """Benchmarks set OMP/HF variables and torch's thread count for their children: undo both afterwards."""
    monkeypatch.setenv("SPP_TEST_DATA", str(test_data))
    saved_environment, threads = dict(os.environ), torch.get_num_threads()
    yield
    os.environ.clear()
    os.environ.update(saved_environment)
    torch.set_num_threads(threads)


def run(main, tmp_path, *argv) -> dict:
    out = tmp_path / "report.json"
    main(["--smoke", *argv, "--out", str(out)])
    return json.loads(out.read_text())


def positive(value) -> bool:
    return isinstance(value, int | float) and value > 0 and value == value


def test_prune(tmp_path):
    report = run(prune.main, tmp_path)
    (result,) = report["runs"]
    assert "failed" not in result, result
    assert result["model"] == "builtin:tiny-llama" and result["method"] == "wanda"
    assert result["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert all(positive(result[key]) for key in ("process_seconds", "prune_seconds", "peak_rss_mb"))
    assert result["peak_rss_mb"] >= result["rss_before_prune_mb"]
    assert len(result["block_seconds"]) == 4 and report["machine"]["cpus"] >= 1


def test_prune_peer_with_owl(tmp_path, test_data):
    """--peer --sparsity-profile owl (benchmarks.prune_owl): the matched spp worker, its forward floor, the checks,
    the perplexities and the OWL comparison; the peer's rows only where llm-compressor is installed."""
    report = run(prune_owl.main, tmp_path, "--data-dir", str(test_data))
    (summary,) = report["results"]
    spp_run = summary["runs"]["spp"][0]
    assert spp_run["sparsity"]["matches_target"] and summary["checks"]["identical_weights_across_repeats"]["spp"]
    assert all(positive(spp_run[key]) for key in ("process_seconds", "peak_rss_mb", "forward_two_passes_seconds"))
    assert spp_run["prune_seconds"] <= spp_run["process_seconds"]
    for values in summary["perplexity"].values():
        assert values["windows"] == 4 and positive(values["dense"]) and positive(values["spp"])
    owl = summary["owl"]
    assert len(owl["blocks"]) == 4
    assert owl["spp_formula_in_eager_attention_max_abs_difference_from_spp"] < 0.05
    assert sum(row["spp_sparsity"] for row in owl["blocks"]) / 4 == pytest.approx(0.5, abs=1e-6)
    if report["peer"] is not None:  # skipped (llm-compressor is not installed): spp's side only
        assert set(summary["runs"]) == {"spp"} and summary["ratio_spp_over_peer"] is None


def test_prune_memory(tmp_path):
    report = run(prune_memory.main, tmp_path)
    assert [run["streaming"] for run in report["runs"]] == ["on", "off"]
    assert all("failed" not in run and positive(run["peak_rss_mb"]) for run in report["runs"]), report["runs"]
    summary = report["summary"]["wanda"]
    assert summary["on"]["peak_growth_2_to_2_blocks"] == 0.0
    assert positive(summary["streaming_over_in_memory_block_seconds"]["2"])


def test_prune_overlap(tmp_path):
    report = run(prune_overlap.main, tmp_path)
    assert [run["variant"] for run in report["runs"]] == ["in-memory", "streamed", "streamed-inline"]
    assert all(len(run["block_seconds"]) == 2 and len(run["load_before"]) == 3 for run in report["runs"])
    assert positive(report["summary"]["streamed_over_in_memory"]["mean_block_seconds"])


def test_finetune(tmp_path):
    report = run(finetune.main, tmp_path, "--variants", "lora,recompute,masked-lora")  # all 8: ~20 s more
    variants = report["models"]["smoke"]["variants"]
    assert set(variants) == {"lora", "recompute", "masked-lora"}
    assert variants["lora"]["step_ratio_vs_lora"] == 1.0
    for name, row in variants.items():
        assert positive(row["step_seconds_median"]) and row["trainable_params"] > 0, name
        assert row["peak_step_bytes"] >= 0 and row["resident_bytes"] > 0, name
    assert variants["lora"]["step_ratio_vs_lora"] == 1.0


def test_eval(tmp_path, test_data):
    report = run(eval_benchmark.main, tmp_path, "--data-dir", str(test_data))
    ppl = report["spp_wikitext2_token_ppl"]
    assert ppl["windows"] > 0 and 1 < ppl["value"] < 4096  # at most the vocabulary: better than uniform
    bundle = report["spp_bundle_in_process"]
    assert set(bundle["acc"]) == set(bundle["n-samples"]) and len(bundle["acc"]) == 8
    assert all(0 <= acc <= 1 for acc in bundle["acc"].values())
    assert "spp_cli" not in report  # --smoke skips the whole-process runs


def test_matmul(tmp_path):
    report = run(matmul.main, tmp_path, "--threads", "1")
    assert len(report["results"]) == sum(len(shapes) for _, shapes in matmul.SHAPES.values())
    assert all(positive(row["gflops"]) for row in report["results"])


def test_prune_dtype(tmp_path):
    report = run(prune_dtype.main, tmp_path)
    rows = report["results"]
    assert len(rows) == len(prune_dtype.METHODS) * len(prune_dtype.PATTERNS) * len(prune_dtype.DTYPE_PAIRS)
    assert all(positive(row["median_seconds"]) and 0 < row["reconstruction_error"] < 1 for row in rows)
    assert all(row["mask_agreement_with_fp32_compute"] == 1.0 for row in rows if row["compute_dtype"] == "float32")


def test_real_model(tmp_path, test_data):
    report = run(real_model.main, tmp_path, "--data-dir", str(test_data))
    dense, (row,) = report["rows"][0], report["rows"][1:]
    assert (row["method"], row["pattern"], row["tool"]) == ("wanda", "2:4", "spp")
    assert row["prune"]["sparsity"]["matches_target"]
    assert positive(dense["eval"]["wikitext2_ppl"]) and row["eval"]["wikitext2_ppl"] > dense["eval"]["wikitext2_ppl"]
    check = report["layer_check"]["results"]["wanda 2:4"]
    for name, by_tool in check.items():  # spp's Wanda on block 0 is the reference's
        assert by_tool["spp"]["reference"]["mask_agreement_with_reference"] == 1.0, name
    recovery = report["recovery"]["spp"]
    assert recovery["verify"]["ok"] and recovery["verify"]["lost_zeros"] == 0
    assert positive(recovery["eval"]["wikitext2_ppl"])


def test_merge_memory(tmp_path):
    from benchmarks import merge_memory

    report = run(merge_memory.main, tmp_path)
    assert [(run["blocks"], run["streaming"]) for run in report["runs"]] == [(2, "on"), (2, "off")]
    assert all("failed" not in run and positive(run["peak_rss_mb"]) for run in report["runs"]), report["runs"]
    assert all(run["peak_rss_mb"] >= run["rss_after_imports_mb"] for run in report["runs"])
    assert report["summary"]["on"]["peak_growth_2_to_2_blocks"] == 0.0


def test_reconstruct_params(tmp_path):
    from benchmarks import reconstruct_params

    report = run(reconstruct_params.main, tmp_path)
    (adapter,) = report["results"].values()
    assert adapter["every_block_lower"] and len(adapter["error_after"]) == 4 and adapter["same_bytes_every_repeat"]
    assert positive(adapter["held_out_ppl"]) and positive(adapter["median_seconds"])
    assert len(report["machine"]["loadavg_at_start"]) == 3 and report["reconstruct"]["steps_per_block"] == 1


def test_recovery_study(tmp_path, test_data):
    from benchmarks import recovery_study

    report = run(recovery_study.main, tmp_path, "--work", str(tmp_path / "work"), "--data-dir", str(test_data))
    names = [stage["name"] for stage in report["recipe"]["stages"]]
    assert len(names) == 23 and names[-1] == "eval" and report["rows"] == []  # every row planned, none trained
    gemma = recovery_study.study_recipe("gemma", "/models/gemma3-270m", test_data, tmp_path, recovery_study.GEMMA_ROWS)
    assert [stage["name"] for stage in gemma["stages"]] == [*recovery_study.GEMMA_ROWS, "eval"]
    assert gemma["stages"][-1]["models"] == ["dense", *recovery_study.GEMMA_ROWS]
    assert all(stage["max_steps"] == 12 for stage in gemma["stages"] if stage["type"] == "finetune")


def test_recovery_study_reconstructs_then_trains_the_best_fine_tune(tmp_path, test_data):
    """--rc-best: per start, the fine-tune with the lowest last-point validation ppl is trained again from the
    reconstructed prune, and the eval scores it; every row of the full study is planned with the asked sizes."""
    from benchmarks import recovery_study

    sizes = recovery_study.Sizes(steps=48, batch=8, curve_windows=16, zero_shot=("boolq", "rte"))
    recipe = recovery_study.study_recipe("gemma", "/models/g", test_data, tmp_path, recovery_study.ALL_ROWS, sizes)
    names = [stage["name"] for stage in recipe["stages"]]
    assert names == [*recovery_study.ALL_ROWS, "eval"] and len(names) == 15
    assert recipe["stages"][-1]["tasks"] == ["wikitext2", "boolq", "rte"]
    tuned = [stage for stage in recipe["stages"] if stage["type"] == "finetune"]
    assert {(stage["max_steps"], stage["eval_steps"], stage["eval_ppl_windows"]) for stage in tuned} == {(48, 16, 16)}
    last_ppl = {"w24-spp-sft": 271.0, "w24-spp-distill": 257.0, "w24-mlora-sft": 187.2, "w24-mlora-distill": 171.6}
    for name, ppl in last_ppl.items():  # the w70 fine-tunes did not finish: no spp.json
        (tmp_path / name).mkdir()
        curve = [{"step": 0, "held_out_loss": 4.6, "ppl": 323.0}, {"step": 48, "held_out_loss": 2.0, "ppl": ppl}]
        (tmp_path / name / "spp.json").write_text(json.dumps({"training": {"curve": curve}}))
    best = recovery_study.best_fine_tunes(recipe, tmp_path)
    assert {start: stage["name"] for start, stage in best.items()} == {"w24": "w24-mlora-distill"}
    with_best = recovery_study.with_best_after_reconstruct(recipe, best, test_data, sizes)
    added = with_best["stages"][-2]
    assert (added["name"], added["input"], added["method"], added["objective"]) == \
        ("w24-rc-best", "w24-rc", "masked-lora", "distill")
    assert with_best["stages"][-1]["models"][-1] == "w24-rc-best" and len(with_best["stages"]) == 16

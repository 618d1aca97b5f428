"""`spp bench` on a CPU: the JSON layout scripts read, numbers that make sense, the table for people, the plain
statement that 2:4 kernels need a GPU, and one-line errors for bad input."""

import json

import pytest
import torch
from conftest import run_spp

from spp_cli.adapters import METHODS
from spp_cli.bench.inference import NEEDS_CUDA
from spp_cli.bench.measure import at_depth, fit_depths
from spp_cli.bench.shapes import SHAPES, random_shape_model, shape_config

SMALL = ["--nsamples", "2", "--seqlen", "16", "--steps", "1", "--device", "cpu"]
PRUNE_KEYS = {"method", "pattern", "sparsity", "blocks_measured", "seconds_measured", "seconds_per_block",
              "seconds_whole_model", "peak_memory_bytes", "memory_at_start_bytes"}
METHOD_KEYS = {"method", "keeps_zeros", "trainable_params", "step_seconds", "step_seconds_per_block",
               "step_seconds_whole_model", "peak_memory_bytes", "peak_memory_bytes_whole_model",
               "merge_seconds_measured", "merge_seconds_whole_model", "zeros_kept_after_merge",
               "step_ratio_vs_lora", "memory_ratio_vs_lora"}


def bench_json(argv, capsys) -> dict:
    code, out, err = run_spp(["bench", *argv, "--format", "json"], capsys)
    assert code == 0, err
    return json.loads(out)


def assert_sane(result: dict, blocks: int, real_depth: int, methods=METHODS) -> None:
    assert result["model"]["blocks_built"] == blocks and result["model"]["real_depth"] == real_depth
    assert result["device"]["type"] == "cpu" and result["memory_measure"].startswith("process peak RSS")
    assert [(row["method"], row["pattern"]) for row in result["prune"]] == [
        ("wanda", "unstructured"), ("wanda", "2:4"), ("sparsegpt", "unstructured"), ("sparsegpt", "2:4")]
    for row in result["prune"]:
        assert set(row) == PRUNE_KEYS, row
        assert row["blocks_measured"] == blocks and 0 < row["seconds_per_block"] <= row["seconds_measured"]
        assert row["seconds_whole_model"] >= row["seconds_measured"] and row["peak_memory_bytes"] > 0
    recovery = result["recovery"]
    assert recovery["precision"] == "float32" and recovery["baseline"].startswith("lora (PEFT LoRA, r 8")
    rows = {row["method"]: row for row in recovery["methods"]}
    assert list(rows)[0] == "lora" and set(rows) == {"lora", *methods}
    for method, row in rows.items():
        assert METHOD_KEYS <= set(row) <= METHOD_KEYS | {"note"}, (method, row)
        assert row["step_seconds_whole_model"] > 0 and row["trainable_params"] > 0
        assert row["peak_memory_bytes_whole_model"] is not None and row["peak_memory_bytes_whole_model"] > 0
        assert row["merge_seconds_whole_model"] >= row["merge_seconds_measured"] >= 0
        assert row["zeros_kept_after_merge"] is (None if method == "lora" else True)
    assert rows["lora"]["step_ratio_vs_lora"] == 1.0
    assert rows["lora"]["trainable_params"] < rows["masked-full"]["trainable_params"]
    evaluation = result["eval"]
    assert evaluation["tokens_per_forward"] == 16
    assert 0 < evaluation["tokens_per_second_whole_model"] <= evaluation["tokens_per_second_measured"] * 1.0001
    assert result["semi_structured"] == {"available": False, "statement": NEEDS_CUDA}


def test_bench_of_the_shipped_tiny_model_keeps_2_of_its_4_blocks_and_extrapolates(capsys):
    result = bench_json(["builtin:tiny-llama", *SMALL], capsys)
    assert result["model"]["source"] == "builtin:tiny-llama" and result["model"]["shape"] is None
    assert result["model"]["dtype"] == "float32"  # auto on a CPU, whatever the checkpoint stores
    assert_sane(result, blocks=2, real_depth=4)


def test_bench_of_the_tiny_shape_is_random_init_of_its_real_sizes(capsys):
    result = bench_json(["--shape", "tiny", "--blocks", "3", "--methods", "spp,masked-full", *SMALL], capsys)
    sizes = SHAPES["tiny"]
    assert result["model"]["hidden_size"] == sizes["hidden_size"] and result["model"]["num_key_value_heads"] == 2
    assert result["options"]["seqlen"] == 16 and result["options"]["device"] == "cpu"
    assert_sane(result, blocks=3, real_depth=sizes["num_hidden_layers"], methods=("spp", "masked-full"))


def test_the_table_says_what_it_measured_and_that_2_of_4_kernels_need_a_gpu(capsys):
    code, out, err = run_spp(["bench", "--shape", "tiny", *SMALL, "--sections", "eval,semi-structured"], capsys)
    assert code == 0, err
    assert "2 of 4 blocks built" in out and "tokens/s for the whole model" in out
    assert NEEDS_CUDA in out and "peak memory: process peak RSS" in out
    assert "prune (" not in out  # only the sections asked for


@pytest.mark.parametrize("argv, message", [
    ([], "give a MODEL or --shape NAME"),
    (["builtin:tiny-llama", "--shape", "tiny"], "exactly one"),
    (["--shape", "llama-6b"], "unknown --shape 'llama-6b'"),
    (["--shape", "tiny", "--blocks", "0"], "--blocks 0 is invalid"),
    (["--shape", "tiny", "--methods", "spp,qlora"], "'qlora' is unknown"),
    (["--shape", "tiny", "--sections", "prune,speed"], "'speed' is unknown"),
    (["--shape", "tiny", "--seqlen", "4096"], "exceeds the model's 512 positions"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    code, out, err = run_spp(["bench", *argv], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_shapes_are_the_public_configs_sizes():
    config = shape_config("llama-70b", 2)
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size, config.num_hidden_layers, config.spp_real_depth) == (8192, 28672, 64, 8, 32000, 2, 80)
    assert shape_config("llama3-8b", 1).rope_parameters["rope_theta"] == 500000.0


def test_at_depth_runs_the_first_blocks_only_and_restores_the_model():
    model = random_shape_model("tiny", 3)
    ids = torch.randint(0, 4096, (1, 8))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with at_depth(model, 1):
            shallow = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert torch.equal(full, again) and not torch.equal(full, shallow)


def test_the_depth_line_extrapolates_and_falls_back_to_equal_blocks_on_noise():
    fit = fit_depths(3.0, 5.0, 3)  # 2 fixed + 1 per block
    assert (fit.per_block, fit.fixed, fit.at(32), fit.note) == (1.0, 2.0, 34.0, None)
    noisy = fit_depths(5.0, 4.0, 2)
    assert noisy.per_block == 2.0 and noisy.at(10) == 20.0 and "upper bound" in noisy.note

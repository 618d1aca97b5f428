"""The memory plan (spp_cli/memory_plan): shapes read without weights, the estimates against measured peak RSS, the
stage-start event, the fit warnings and `spp run --dry-run`'s plans."""

import json

import pytest
from tiny_models import save_random_model

from benchmarks.memory_plan import measure
from spp_cli.events import Event
from spp_cli.memory_plan import Devices, check_fit, plan_text, read_model_shape
from spp_cli.memory_plan.estimate import GiB, eval_estimate, finetune_estimate, prune_estimate
from spp_cli.memory_plan.shape import shape_from_config
from spp_cli.memory_plan.stages import suggest
from spp_cli.memory_plan.tables import llama_shape

# the two measured models (vocab 8192, fp32): weights of ~160 and ~270 MB, well above what else a stage holds
SIZES = [dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
              num_key_value_heads=12),
         dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
              num_key_value_heads=16)]


def test_shape_from_safetensors_headers_matches_the_model(tmp_path):
    model = save_random_model(tmp_path / "m", vocab_size=1024, hidden_size=128, intermediate_size=256,
                              num_hidden_layers=3)
    shape = read_model_shape(model)
    config = json.loads((model / "config.json").read_text())
    assert shape.parameters == shape_from_config(config).parameters  # the arithmetic agrees with the files
    assert shape.blocks == 3 and shape.stored_dtype == "float32"
    assert shape.stored_bytes == shape.parameters * 4
    assert shape.largest_tensor == 1024 * 128


def test_llama_70b_numbers():
    """The arithmetic on a public shape: 69.0B parameters, 128.5 GiB in bf16."""
    shape = llama_shape("llama-70b")
    assert shape.parameters == pytest.approx(68.98e9, rel=1e-3)
    assert shape.stored_bytes / GiB == pytest.approx(128.5, abs=0.1)
    streamed = prune_estimate(shape, method="sparsegpt", nsamples=128, seqlen=2048, calibrated=True, streamed=True,
                              device="cuda")
    assert streamed.cpu_bytes < 8 * GiB and streamed.device_bytes < 80 * GiB


def test_the_fit_check_names_the_option_that_would_fit():
    shape = llama_shape("llama-7b")
    devices = Devices(cpu_ram=8 * GiB, accelerators={"cuda": 24 * GiB}, disk=1000 * GiB)
    in_memory = prune_estimate(shape, method="wanda", nsamples=128, seqlen=2048, calibrated=True, streamed=False)
    assert check_fit(in_memory, devices, suggest)[0].endswith("use --streaming on (from a local safetensors folder: "
                                                             "one block in RAM)")
    training = finetune_estimate(shape, method="spp", micro_batch_size=8, seqlen=512, gradient_checkpointing=False,
                                 device="cuda")
    (_, on_device) = check_fit(training, devices, suggest)
    assert on_device.startswith("finetune may not fit: its peak cuda is estimated at") and on_device.endswith(
        "use --gradient-checkpointing")
    checkpointed = finetune_estimate(shape, method="spp", micro_batch_size=16, seqlen=2048,
                                     gradient_checkpointing=True, device="cuda")
    assert "use --micro-batch-size " in check_fit(checkpointed, devices, suggest)[-1]
    evaluation = eval_estimate(shape, batch_size=1, seqlen=2048, device="cuda")
    assert "--device-map auto" in check_fit(evaluation, devices, suggest)[-1]
    assert plan_text(evaluation).startswith("plan: peak CPU RAM ~13.2 GiB, device ~13.2 GiB on cuda, disk 0 MiB")


def test_a_stage_announces_its_plan_first(tmp_path):
    from spp_cli.stages.prune import prune

    events = []
    prune("builtin:tiny-llama", tmp_path / "out", method="magnitude", on_event=events.append)
    first = events[0]
    assert isinstance(first, Event) and first.kind == "plan" and first.stage == "prune"
    assert plan_text(first.payload).startswith("plan: peak CPU RAM ~")


def test_dry_run_prints_every_stage_plan(tmp_path):
    from spp_cli.pipeline import run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: builtin:tiny-llama\nstages:\n  - {type: prune, method: magnitude}\n"
                      "  - {type: finetune, data: builtin:python-docs, max_steps: 1}\n"
                      "  - {type: eval, tasks: [ppl:builtin:python-docs:test]}\n")
    summary = run_recipe(recipe, [], dry_run=True)
    plans = {stage["name"]: stage["plan"] for stage in summary["stages"]}
    assert plans["prune"]["assumed"]["streaming"] is True and plans["finetune"]["assumed"]["merge"] == "streaming"
    assert all(plan["cpu_bytes"] > 0 and plan["fixes"] == [] for plan in plans.values())


def test_the_estimates_are_within_30_percent_of_the_measured_peaks(tmp_path):
    """Every stage on the CPU, both models in one fresh process (benchmarks/memory_plan.py): estimated / measured
    peak RSS growth."""
    models = [save_random_model(tmp_path / f"model-{n}", vocab_size=8192, max_position_embeddings=512, **size)
              for n, size in enumerate(SIZES)]
    for result in measure(models, [tmp_path / f"work-{n}" for n in range(len(SIZES))]):
        assert all(0.7 <= ratio <= 1.3 for ratio in result["ratio"].values()), result

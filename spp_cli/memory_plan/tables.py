"""The plan's numbers for the README (7B/13B/70B LLaMA shapes, bf16, one GPU) and for benchmarks/memory_plan.py."""

from __future__ import annotations

from pathlib import Path

from spp_cli.memory_plan.estimate import GiB, MiB, eval_estimate, finetune_estimate, merge_estimate, prune_estimate
from spp_cli.memory_plan.shape import ModelShape, read_model_shape, shape_from_config

# (stage, variant, estimate keyword arguments): the defaults of the commands (DESIGN.md), on one GPU in bf16
README_CASES = (
    ("prune", "sparsegpt, streaming", dict(method="sparsegpt", nsamples=128, seqlen=2048, calibrated=True,
                                           streamed=True)),
    ("prune", "sparsegpt, in memory", dict(method="sparsegpt", nsamples=128, seqlen=2048, calibrated=True,
                                           streamed=False)),
    ("finetune", "spp, micro batch 8 x 512", dict(method="spp", micro_batch_size=8, seqlen=512,
                                                  gradient_checkpointing=False)),
    ("finetune", "spp, micro batch 8 x 512, gradient checkpointing", dict(
        method="spp", micro_batch_size=8, seqlen=512, gradient_checkpointing=True)),
    ("finetune", "masked-full, micro batch 1 x 512, gradient checkpointing", dict(
        method="masked-full", micro_batch_size=1, seqlen=512, gradient_checkpointing=True)),
    ("merge", "streaming", dict(streamed=True)),
    ("merge", "in memory", dict(streamed=False)),
    ("eval", "perplexity, batch 1 x 2048", dict(batch_size=1, seqlen=2048)),
)


def llama_shape(name: str, dtype: str = "bfloat16") -> ModelShape:
    """A public LLaMA's shape (spp_cli/bench/shapes.py) stored in `dtype`."""
    from spp_cli.bench.shapes import shape_named

    return shape_from_config({**shape_named(name), "torch_dtype": dtype})


def shape_rows(name: str, device: str = "cuda") -> list[dict]:
    """One row per README_CASES entry: the plan's peak CPU RAM, device memory and disk (GiB) for shape `name`."""
    shape = llama_shape(name)
    rows = []
    for stage, variant, options in README_CASES:
        if stage == "prune":
            plan = prune_estimate(shape, device=device, **options)
        elif stage == "finetune":
            plan = finetune_estimate(shape, device=device, **options)
        elif stage == "merge":
            plan = merge_estimate(shape, adapter=shape.blocks * sum(16 * i + o for i, o in shape.linears) * 4,
                                  **options)
        else:
            plan = eval_estimate(shape, device=device, **options)
        rows.append({"shape": name, "stage": stage, "variant": variant, "cpu_gib": round(plan.cpu_bytes / GiB, 1),
                     "device_gib": None if plan.device_bytes is None else round(plan.device_bytes / GiB, 1),
                     "disk_gib": round(plan.disk_bytes / GiB, 1)})
    return rows


def stage_plans_for_benchmark(model: str, work: str | Path, spec: dict) -> dict[str, float]:
    """The CPU estimates (MiB above the floor) of benchmarks/memory_plan.py's stages, with its options."""
    work, shape = Path(work), read_model_shape(model)
    pruned = read_model_shape(work / "prune") or shape
    adapter = work / "finetune" / "adapter" / "adapter_model.safetensors"
    adapter_bytes = adapter.stat().st_size if adapter.is_file() else 0
    calibration = dict(method="wanda", nsamples=spec["nsamples"], seqlen=spec["seqlen"], calibrated=True)
    plans = {
        "prune": prune_estimate(shape, streamed=False, **calibration),
        "prune-streaming": prune_estimate(shape, streamed=True, **calibration),
        "finetune": finetune_estimate(pruned, method="spp", micro_batch_size=1, seqlen=spec["seqlen"],
                                      gradient_checkpointing=False, merge="none"),
        "merge": merge_estimate(pruned, adapter=adapter_bytes, streamed=False),
        "merge-streaming": merge_estimate(pruned, adapter=adapter_bytes, streamed=True),
        "eval": eval_estimate(pruned, batch_size=1, seqlen=spec["seqlen"]),
    }
    return {name: round(plans[name].cpu_bytes / MiB, 1) for name in spec["stages"]}

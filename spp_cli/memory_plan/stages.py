"""The memory plan of each stage from its validated options (spp_cli/recipe/schema.py), told at the stage's start
as a "note" event (and a "warning" for what may not fit), and for every stage of a recipe by `spp run --dry-run`.

Nothing here loads weights or imports torch (but to ask a CUDA device for its free memory): config.json and the
safetensors headers give the sizes (spp_cli/memory_plan/shape.py)."""

from __future__ import annotations

import json
from pathlib import Path

from spp_cli.events import Listener, notify
from spp_cli.memory_plan.estimate import (
    StagePlan,
    eval_estimate,
    finetune_estimate,
    merge_estimate,
    prune_estimate,
)
from spp_cli.memory_plan.fit import Devices, check_fit, detect_devices
from spp_cli.memory_plan.shape import ModelShape, model_shape

FSDP = "shard it over several GPUs (accelerate launch --config_file recipes/launch/fsdp2.yaml -m spp_cli finetune ...)"


def _local_safetensors(path: str) -> bool:
    return Path(path).is_dir() and any(Path(path).glob("*.safetensors"))


def _lists_layers(path: str) -> bool:
    """A folder whose spp.json lists its pruned layers (what a streaming merge needs)."""
    manifest = Path(path) / "spp.json"
    try:
        return bool(json.loads(manifest.read_text(encoding="utf-8")).get("layers"))
    except (OSError, ValueError):
        return False


def prune_plan(shape: ModelShape, stage, device: str, streamable: bool) -> StagePlan:
    """A validated PruneStage on a model of `shape`; `streamable`: the input is a local safetensors folder."""
    calibrated = stage.method != "magnitude" or stage.sparsity_profile == "owl" or stage.refine.endswith("reconstruct")
    return prune_estimate(shape, method=stage.method, nsamples=stage.nsamples, seqlen=stage.seqlen,
                          calibrated=calibrated, streamed=stage.streaming != "off" and streamable, device=device,
                          dtype=stage.dtype)


def finetune_plan(shape: ModelShape, stage, device: str, merge: str, teacher: ModelShape | None = None) -> StagePlan:
    """A validated FinetuneStage; `merge`: streaming | memory (the parent cannot stream); `teacher`: a distillation
    teacher's shape (None: none)."""
    return finetune_estimate(shape, method=stage.method, micro_batch_size=stage.micro_batch_size,
                             seqlen=stage.seqlen, gradient_checkpointing=stage.gradient_checkpointing,
                             device=device, dtype=stage.dtype, groups=stage.groups or 16, rank=stage.lora_r or 8,
                             merge="none" if stage.no_merge else merge, teacher=teacher)


def eval_plan(shapes: list[ModelShape], stage, device: str) -> StagePlan:
    """The largest of the stage's models (they are evaluated one after another)."""
    plans = [eval_estimate(shape, batch_size=stage.batch_size, seqlen=stage.seqlen, device=device, dtype=stage.dtype,
                           device_map=getattr(stage, "device_map", None)) for shape in shapes]
    return max(plans, key=lambda plan: (plan.device_bytes or 0, plan.cpu_bytes))


def suggest(plan: StagePlan, resource: str, free: int) -> str:
    """The option that would make `plan` fit `free` bytes of `resource` (CPU RAM, disk, or its device)."""
    if resource == "disk":
        return "free space on that disk or choose another --out"
    if plan.stage == "prune":
        if resource == "CPU RAM" and not plan.assumed["streaming"]:
            return "use --streaming on (from a local safetensors folder: one block in RAM)"
        return "use fewer --nsamples or a shorter --seqlen (the calibration activations)"
    if plan.stage == "finetune":
        if not plan.assumed["gradient_checkpointing"]:
            return "use --gradient-checkpointing"
        per_window = plan.parts["activations"] / plan.assumed["micro_batch_size"]
        fits = int((free - ((plan.device_bytes or plan.cpu_bytes) - plan.parts["activations"])) // per_window)
        if 1 <= fits < plan.assumed["micro_batch_size"]:
            return f"use --micro-batch-size {fits} (--batch-size stays the global batch)"
        return FSDP if resource != "CPU RAM" else "fine-tune on a GPU, or " + FSDP
    if plan.stage == "merge":
        return "merge streaming: from a local safetensors base whose spp.json lists its layers (--streaming on)"
    return ("use --device-map auto (the blocks spread over the GPUs and CPU RAM)" if resource != "CPU RAM"
            else "use --device-map auto with --max-memory and an offload folder, or a smaller --batch-size")


def announce(on_event: Listener | None, plan: StagePlan | None, devices: Devices) -> None:
    """The plan as a "plan" event (render.py prints plan_text), then a "warning" for each resource it may exceed
    (never an error: estimates can be wrong)."""
    if plan is None or on_event is None:
        return
    notify(on_event, plan.stage, "plan", plan)
    for warning in check_fit(plan, devices, suggest):
        notify(on_event, plan.stage, "warning", warning)


def _shape_or_none(model: str, trust_remote_code: bool = False) -> ModelShape | None:
    try:
        return model_shape(model, trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError):  # an odd config or header: no plan, the stage goes on
        return None


def announce_prune(on_event: Listener | None, model_path: str, stage, device: str, out,
                   trust_remote_code: bool = False) -> None:
    if on_event is not None and (shape := _shape_or_none(model_path, trust_remote_code)) is not None:
        announce(on_event, prune_plan(shape, stage, device, _local_safetensors(model_path)),
                 detect_devices(device, out))


def announce_finetune(on_event: Listener | None, model_path: str, stage, out, trust_remote_code: bool = False,
                      teacher: ModelShape | None = None) -> None:
    if on_event is not None and (shape := _shape_or_none(model_path, trust_remote_code)) is not None:
        merge = "streaming" if _local_safetensors(model_path) and _lists_layers(model_path) else "memory"
        announce(on_event, finetune_plan(shape, stage, stage.device, merge, teacher),
                 detect_devices(stage.device, out))


def announce_merge(on_event: Listener | None, base: str, adapter_dir, streaming: str, out) -> None:
    if on_event is not None and (shape := _shape_or_none(base)) is not None:
        weights = Path(adapter_dir) / "adapter_model.safetensors"
        streamed = streaming != "off" and _local_safetensors(base) and _lists_layers(base)
        plan = merge_estimate(shape, adapter=weights.stat().st_size if weights.is_file() else 0, streamed=streamed)
        announce(on_event, plan, detect_devices("cpu", out))


def announce_eval(on_event: Listener | None, models: dict[str, str], stage, device: str, out,
                  trust_remote_code: bool = False) -> None:
    shapes = [s for s in (_shape_or_none(path, trust_remote_code) for path in models.values()) if s is not None]
    if on_event is not None and shapes:
        announce(on_event, eval_plan(shapes, stage, device), detect_devices(device, out))


def recipe_plans(recipe) -> dict[str, dict]:
    """`spp run --dry-run`: each stage's plan as a dict (StagePlan.as_dict(); "fixes" holds the warnings), or None
    where the model's size cannot be read. A stage's not-yet-written input has its root model's shape and is a
    local safetensors folder with an spp.json (so it streams)."""
    from spp_cli.environment import resolve_device
    from spp_cli.pipeline import model_path, stage_output
    from spp_cli.recipe.schema import EvalStage, PruneStage

    def root(reference: str) -> tuple[str, bool]:
        """(the model whose shape `reference` has, whether it will be a folder spp wrote)."""
        from spp_cli.io.checkpoint import resolve_model_path

        written = reference in recipe.stage_names
        while reference in recipe.stage_names:
            reference = recipe.stage(reference).input
        return resolve_model_path(model_path(recipe, reference)), written

    plans = {}
    for stage in recipe.stages:
        device = resolve_device(stage.device)
        if isinstance(stage, EvalStage):
            shapes = [_shape_or_none(root(name)[0], recipe.trust_remote_code) for name in stage.reads()]
            plan = eval_plan([s for s in shapes if s], stage, device) if any(shapes) else None
        else:
            path, written = root(stage.input)
            shape = _shape_or_none(path, recipe.trust_remote_code)
            local = written or _local_safetensors(path)
            if shape is None:
                plan = None
            elif isinstance(stage, PruneStage):
                plan = prune_plan(shape, stage, device, local)
            else:
                merge = "streaming" if local and (written or _lists_layers(path)) else "memory"
                plan = finetune_plan(shape, stage, device, merge)
        if plan is not None:
            check_fit(plan, detect_devices(device, stage_output(recipe, stage)), suggest)
        plans[stage.name] = plan.as_dict() if plan is not None else None
    return plans

"""The finetune stage: a recovery method (SPP, or another from spp_cli/adapters) on a pruned model, merge, check
every zero, save. `finetune` reads as its steps, each a function below or in finetune_merge.py (the steps after
training, on the main process); finetune_plan.py holds what the steps hand each other (FinetunePlan, LoadedBase):

    resolve          the validated options, device, precision, the parent's spp.json and the fingerprint
    check            the parent's provenance and the training records (after the output path and the skip of an
                     identical finished output), all before any weights load
    load             the model, the layers to adapt and the parent's zero hashes (and a distill run's teacher)
    train            trainer.run_finetune in a resumable work dir; on_main_process: the whole adapter on rank 0
    save_adapter, merge_and_check, record    the adapter, the merge with every zero checked, spp.json
    publish          OUT written atomically, the work dir removed

Output layout (DESIGN.md): OUT/ is the merged HF model + spp.json, OUT/adapter/ the adapter (plus run.json: this
run's wall-clock statistics, which vary run to run and so stay out of the hashed manifest). With --no-merge,
OUT/ holds only adapter/ and spp.json; `spp merge` makes the model later with the same checks. Trainer
checkpoints live in a hidden work directory beside OUT until the stage completes, so rerunning the same
command resumes from the last one.
"""

import dataclasses
import os
import shutil
import time
from pathlib import Path

from spp_cli import interrupts, preflight
from spp_cli.adapters import METHOD_OPTIONS, resolved_method_options
from spp_cli.errors import BadInput
from spp_cli.events import Listener, notify
from spp_cli.io import atomic, checkpoint
from spp_cli.io.disk_full import names_output_on_disk_full
from spp_cli.io.manifest import applied_record, stage_manifest, zeros_sha256
from spp_cli.io.outputs import check_output_path, existing_output, fingerprint
from spp_cli.memory_plan.stages import announce_finetune
from spp_cli.recipe.schema import FinetuneStage
from spp_cli.stages.finetune_merge import (
    merge_and_check,
    on_main_process,
    parent_merge_input,
    save_adapter,
    unchanged_merge_warning,
)
from spp_cli.stages.finetune_plan import FinetunePlan, LoadedBase, training_dtype
from spp_cli.stages.merge import frozen_experts_warnings, not_adapted


def fingerprinted_options(options: FinetuneStage, precision: str) -> dict:
    """What decides the result: the schema's recorded options (Stage.NOT_RECORDED; method options resolved to the
    method's defaults, unread ones left out), the fixed training constants and the precision training runs in."""
    from spp_cli.training.trainer import TRAINING_CONSTANTS, learning_rate

    values = dataclasses.asdict(options)
    general = {key: value for key, value in options.recorded_options().items() if key not in METHOD_OPTIONS}
    return {
        **general,
        "lr": learning_rate(options),
        **resolved_method_options(options.method, values),
        **TRAINING_CONSTANTS,
        "precision": precision,
    }


def check_parent(model_path: str, parent_manifest: dict | None, keeps_zeros: bool, method: str) -> None:
    """Provenance before any training: a zero-keeping method needs a parent with zeros (not a dense LoRA merge),
    and a parent's weights must still be the ones its spp.json describes (hashes of every listed layer)."""
    if parent_manifest is None:
        return
    if keeps_zeros and parent_manifest.get("dense"):
        raise BadInput(f"'{model_path}' is a dense {parent_manifest.get('method', 'lora')} output (its zeros are "
                       f"gone): --method {method} keeps zeros; fine-tune the pruned model instead")
    from spp_cli.io.manifest import weight_sha256
    from spp_cli.io.stored_weights import StoredWeights

    layers = parent_manifest.get("layers") or {}
    if not layers:
        return
    stored = StoredWeights(Path(model_path))
    for name, record in layers.items():
        weight = stored[name]
        if zeros_sha256(weight) != record.get("zeros_sha256") or weight_sha256(weight) != record.get("weight_sha256"):
            raise BadInput(f"'{model_path}': layer {name} no longer matches its spp.json (the weights were changed "
                           "after spp wrote them): restore the checkpoint or rerun the stage that made it")


@names_output_on_disk_full
def finetune(
    model_dir: str,
    out: str | Path,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    on_event: Listener | None = None,
    **options,
) -> dict:
    """Fine-tune `model_dir` into `out`; returns the manifest (plus "run": this run's statistics).

    `options` are the FinetuneStage fields (spp_cli/recipe/finetune_schema.py) by name: data (required), method, lr,
    max_steps, ...; None means the default (the method's, for lr and the method-specific options). Skips a
    finished identical output. `on_event` (spp_cli/events.py) gets a "step" per optimizer step and the warnings.
    """
    started = time.time()
    plan = resolve(model_dir, Path(out), options, {"trust_remote_code": trust_remote_code,
                                                   "allow_pickle": allow_pickle})
    check_output_path(plan.out, [plan.model_path])
    if existing_output(plan.out, plan.fingerprint, overwrite):
        return {**checkpoint.read_manifest(plan.out), "skipped": True}
    records = check(plan)
    announce_plan(plan, on_event)
    notify(on_event, "finetune", "note", f"loading {plan.model_dir} and tokenizing {len(records)} training records")
    base = load(plan, on_event)
    result = train(plan, base, records, on_event)
    if not result.is_main_process:
        return {"stage": "finetune", "rank": int(os.environ.get("RANK", "0"))}  # rank 0 merges, checks, saves
    merge_input = parent_merge_input(plan)  # the parent's shards, opened once (None: the merge is in memory)
    result = on_main_process(plan, base, result, merge_input, on_event)
    run = save_adapter(plan, base, result)
    model_out, layers = merge_and_check(plan, base, result, merge_input)
    manifest = record(plan, base, result, layers)
    return {**publish(plan, model_out, base.tokenizer, manifest, started, configured=result.model), "run": run}


def announce_plan(plan: FinetunePlan, on_event: Listener | None) -> None:
    """The memory plan's line, once (on the main process of a multi-process run), with the distillation teacher's
    weights when there is one."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    teacher = None
    if plan.options.objective == "distill":
        from spp_cli.memory_plan.stages import _shape_or_none
        from spp_cli.training.teacher import find_teacher

        reference = find_teacher(plan.options.teacher, plan.model_path, None)
        teacher = _shape_or_none(reference, plan.loading["trust_remote_code"]) if reference else None
    announce_finetune(on_event, plan.model_path, plan.options, plan.out, plan.loading["trust_remote_code"], teacher)


def resolve(model_dir: str, out: Path, options: dict, loading: dict) -> FinetunePlan:
    """The keyword options through the schema (unknown keys, ranges, an option of another method) and the method's
    own rules, all BadInput before anything loads; the device and the precision training runs in, the parent's
    spp.json and the fingerprint."""
    from spp_cli.recipe.resolve import validate_options
    from spp_cli.training.trainer import check_options, resolved_precision, training_device, world_size

    train_options = validate_options(FinetuneStage, options)
    train_options.device = training_device(train_options.device)
    train_options.dtype = train_options.dtype or "auto"
    adapter = check_options(train_options, world_size())
    precision = resolved_precision(train_options.dtype, train_options.device)
    model_path = checkpoint.resolve_model_path(model_dir)
    parent_manifest = checkpoint.read_manifest(model_path) if Path(model_path).is_dir() else None
    config = fingerprinted_options(train_options, precision)
    parent = parent_manifest.get("manifest_sha256") if parent_manifest else model_dir
    return FinetunePlan(model_dir, model_path, out, train_options, adapter, parent_manifest, config,
                        fingerprint(config, parent), loading)


def check(plan: FinetunePlan) -> list[dict]:
    """The parent's provenance, the stage's preflight (spp_cli/preflight.py: seqlen, logger, source, groups), then
    the training records read and validated (one canonical format a record, so the trainer's build_examples sees
    no surprise); all before the model loads."""
    from spp_cli.data.formats import normalize_records
    from spp_cli.data.sources import read_records

    options = plan.options
    check_parent(plan.model_path, plan.parent_manifest, plan.adapter.keeps_zeros, options.method)
    preflight.check_finetune(options, plan.model_dir, **plan.loading)
    return normalize_records(read_records(options.data), options.data_format, mask_prompt=options.mask_prompt,
                             source=options.data)


def load(plan: FinetunePlan, on_event: Listener | None) -> LoadedBase:
    """The model in its training dtype, the pruned layers (the parent's spp.json, else every linear with a zero)
    and those the method adapts; BadInput when it adapts none of them."""
    from pruners.experts import weight_of
    from spp_cli.adapters.base import default_targets, split_fused_experts

    options = plan.options
    model, tokenizer = checkpoint.load_model(plan.model_dir, dtype=training_dtype(options.dtype, options.device),
                                             **plan.loading)
    pruned = default_targets(model, plan.parent_manifest)
    targets = pruned if plan.adapter.adapts_fused_experts else split_fused_experts(model, pruned)[0]
    if not targets:
        raise BadInput(f"'{plan.model_dir}': every pruned layer is a fused MoE expert, which --method "
                       f"{options.method} does not adapt: use --method spp or masked-full, or prune other linears too")
    if plan.parent_manifest is None:
        notify(on_event, "finetune", "warning",
               f"'{plan.model_dir}' has no spp.json: its current zeros define the mask to keep")
    parent_zeros = {name: zeros_sha256(weight_of(model, name)) for name in pruned}
    teacher, teacher_record = None, None
    if options.objective == "distill":
        from spp_cli.training.teacher import load_teacher

        teacher, teacher_record = load_teacher(options, plan.model_dir, training_dtype(options.dtype, options.device),
                                               plan.loading)
        notify(on_event, "finetune", "note", f"distilling from {teacher_record['teacher']['path']}: "
               f"{teacher_record['teacher_memory_mb']:.0f} MiB of weights beside the student")
    return LoadedBase(model, tokenizer, pruned, targets, parent_zeros, model.spp_stored_dtype, teacher, teacher_record)


def train(plan: FinetunePlan, base: LoadedBase, records: list[dict], on_event: Listener | None):
    """trainer.run_finetune in the stage's work dir, resuming its last checkpoint; a run refused before its first
    checkpoint leaves nothing behind."""
    from spp_cli.training.distill import Distillation
    from spp_cli.training.phases import resume_note
    from spp_cli.training.trainer import run_finetune

    work_dir = plan.work_dir
    _claim_work_dir(work_dir, plan.fingerprint)
    if note := resume_note(work_dir / "checkpoints"):  # "resuming from step N (checkpoint ...)"
        notify(on_event, "finetune", "note", note)
    options = plan.options
    objective = None if base.teacher is None else Distillation(base.teacher, options.distill_temperature,
                                                                options.distill_weight)
    try:
        return run_finetune(base.model, base.tokenizer, records, options, work_dir, target_names=base.targets,
                            callbacks=_progress_callbacks(on_event, options), objective=objective,
                            on_curve_point=lambda text: notify(on_event, "finetune", "note", text))
    except BadInput:
        if not any(work_dir.glob("checkpoints/checkpoint-*")):
            shutil.rmtree(work_dir, ignore_errors=True)  # nothing to resume: leave nothing behind
        raise
    finally:
        base.teacher = None  # the merge does not need it: its memory goes with the objective


def record(plan: FinetunePlan, base: LoadedBase, result, layers: dict) -> dict:
    """spp.json: provenance, the layers, the fingerprinted config, the adapter's record and the training curve
    (identical for a resumed and an uninterrupted run: the resume itself is in run.json, not hashed)."""
    parent = plan.parent_manifest or {}
    keeps_zeros = result.adapter.keeps_zeros
    frozen_experts = not_adapted(base.pruned, result.adapter.target_modules())
    warnings = (frozen_experts_warnings(frozen_experts, result.method)
                + unchanged_merge_warning(layers, plan.parent_manifest, base.stored_dtype))
    return stage_manifest(
        "finetune",
        parent=checkpoint.parent_record(plan.model_path, plan.parent_manifest),
        method=result.method,
        pattern=parent.get("pattern") if keeps_zeros else None,
        target_sparsity=parent.get("target_sparsity") if keeps_zeros else None,
        dense=not keeps_zeros,
        layers=layers,
        config=plan.config,
        applied=applied_record(**result.applied, stored_dtype=base.stored_dtype,
                               **{k: v for k, v in (base.teacher_record or {}).items() if k == "teacher_memory_mb"}),
        fingerprint=plan.fingerprint,
        merged=not plan.options.no_merge,
        adapter=result.adapter.record(),
        training={
            "steps": result.steps,
            "loss_curve": result.train_curve,
            **({"kl_curve": result.kl_curve} if base.teacher_record else {}),  # distill: the KL beside the loss
            "eval_loss": result.eval_loss,
            "trainable_params": result.trainable_params,
            **_curve_record(result),
        },
        **({"distillation": {k: v for k, v in base.teacher_record.items() if k != "teacher_memory_mb"}}
           if base.teacher_record else {}),  # the teacher's memory depends on this machine's dtype: in applied
        **({"frozen_experts": len(frozen_experts)} if frozen_experts else {}),
        **({"warnings": warnings} if warnings else {}),
    )


def _curve_record(result) -> dict:
    """spp.json's recovery curve (with eval_steps only, so other manifests stay as they were): "curve", the points
    {step, train_tokens, held_out_loss[, ppl]}, and "curve_ppl", how the ppl was measured."""
    if result.curve is None:
        return {}
    return {"curve": result.curve, **({"curve_ppl": result.curve_ppl} if result.curve_ppl else {})}


def publish(plan: FinetunePlan, model_out, tokenizer, manifest: dict, started: float, configured=None) -> dict:
    """OUT/ atomically: the merged model (`model_out`: a model, or a StreamingMerge's staged shards, whose config is
    `configured`'s) + adapter/ + spp.json (or, with --no-merge, adapter/ + spp.json); the work dir goes. Once OUT/ is
    in place the run is done, whatever a Ctrl-C does after (spp_cli/interrupts.py). Returns the finished manifest."""
    from spp_cli.stages.merge_streaming import StreamingMerge

    adapter_dir = plan.work_dir / "adapter"
    if plan.options.no_merge:
        manifest = _save_adapter_only(plan.out, adapter_dir, manifest, started)
    elif isinstance(model_out, StreamingMerge):
        manifest = model_out.publish(plan.out, manifest, tokenizer, started, extra_dirs={"adapter": adapter_dir},
                                     configured=configured)
    else:
        manifest = checkpoint.save_checkpoint(model_out, tokenizer, plan.out, manifest, parent_dir=plan.model_path,
                                              started=started, extra_dirs={"adapter": adapter_dir})
    interrupts.output_published()
    shutil.rmtree(plan.work_dir, ignore_errors=True)
    return manifest


def _progress_callbacks(on_event: Listener | None, options: FinetuneStage) -> list:
    """Events, when someone listens: "step" per optimizer step, "progress" per held-out batch, phases.py's notes."""
    if on_event is None:
        return []
    from spp_cli.training.phases import HeldOutProgress, PhaseNotes
    from spp_cli.training.progress import TrainingProgress

    def on_update(update: dict) -> None:
        notify(on_event, "finetune", "step", update)

    return [TrainingProgress(on_update, tokens_per_step=options.batch_size * options.seqlen),
            PhaseNotes(lambda text: notify(on_event, "finetune", "note", text)),
            HeldOutProgress(lambda progress: notify(on_event, "finetune", "progress", progress))]


def _claim_work_dir(work_dir: Path, stage_fingerprint: str) -> None:
    """Reuse a work dir only for the same stage (resume); a different run's leftovers are cleared."""
    marker = work_dir / "fingerprint"
    if work_dir.exists() and (not marker.exists() or marker.read_text() != stage_fingerprint):
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(stage_fingerprint)


def _save_adapter_only(out: Path, adapter_dir: Path, manifest: dict, started: float) -> dict:
    with atomic.atomic_dir(out) as staging:
        shutil.copytree(adapter_dir, staging / "adapter")
        finished = checkpoint.finish_manifest(manifest, time.time() - started)
        checkpoint.write_manifest(staging, finished)
    return finished

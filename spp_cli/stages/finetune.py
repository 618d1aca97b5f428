"""The finetune stage: a recovery method (SPP, or another from spp_cli/adapters) on a pruned model, merge, check
every zero, save. `finetune` reads as its steps, each a function below:

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
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spp_cli import interrupts, preflight
from spp_cli.adapters import METHOD_OPTIONS, resolved_method_options
from spp_cli.errors import BadInput
from spp_cli.events import Listener, notify
from spp_cli.io import atomic, checkpoint
from spp_cli.io.disk_full import names_output_on_disk_full
from spp_cli.io.manifest import applied_record, layers_record, stage_manifest, zeros_sha256
from spp_cli.io.outputs import check_output_path, existing_output, fingerprint
from spp_cli.memory_plan.stages import announce_finetune
from spp_cli.recipe.schema import FinetuneStage
from spp_cli.stages.merge import check_zeros_kept, frozen_experts_warnings, not_adapted

RUN_RECORD = "run.json"  # in OUT/adapter/: resumed_from, step seconds, peak memory (not hashed)


def _compute_dtype(dtype: str, device: str) -> str:
    """fp32 on CPU; the checkpoint's dtype elsewhere (autocast handles bf16/fp16 on GPUs)."""
    if dtype == "auto" and device == "cpu":
        return "float32"
    return dtype


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

    `options` are the FinetuneStage fields (spp_cli/recipe/schema.py) by name: data (required), method, lr,
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
    announce_finetune(on_event, plan.model_path, plan.options, plan.out, plan.loading["trust_remote_code"])
    notify(on_event, "finetune", "note", f"loading {plan.model_dir} and tokenizing {len(records)} training records")
    base = load(plan, on_event)
    result = train(plan, base, records, on_event)
    if not result.is_main_process:
        return {"stage": "finetune", "rank": int(os.environ.get("RANK", "0"))}  # rank 0 merges, checks, saves
    result = on_main_process(plan, base, result, on_event)
    run = save_adapter(plan, base, result)
    model_out, layers = merge_and_check(plan, base, result)
    manifest = record(plan, base, result, layers)
    return {**publish(plan, model_out, base.tokenizer, manifest, started, configured=result.model), "run": run}


@dataclass
class FinetunePlan:
    """What `resolve` decides before any weights are read."""

    model_dir: str  # as given: a directory, a hub id or builtin:NAME (what load_model reads)
    model_path: str  # its local directory
    out: Path
    options: FinetuneStage  # validated; device and dtype resolved
    adapter: Any  # the method's adapter, not yet injected (keeps_zeros, adapts_fused_experts)
    parent_manifest: dict | None  # the parent's spp.json (None for a model spp did not write)
    config: dict  # the fingerprinted options: spp.json's "config"
    fingerprint: str
    loading: dict  # trust_remote_code, allow_pickle

    @property
    def work_dir(self) -> Path:
        """Trainer checkpoints and the adapter until the stage completes (a rerun resumes from them)."""
        return atomic.work_dir(self.out)


@dataclass
class LoadedBase:
    """The model `load` read, with what the later steps compare against."""

    model: Any
    tokenizer: Any
    pruned: list[str]  # every pruned layer (fused MoE expert slices included)
    targets: list[str]  # the ones the method adapts
    parent_zeros: dict[str, str]  # name -> zeros_sha256 before training
    stored_dtype: Any  # the checkpoint's dtype, which the merged model is saved in
    teacher: Any = None  # objective distill: the frozen teacher model (released after training)
    teacher_record: dict | None = None  # spp.json's "distillation" and the teacher's MiB (teacher.load_teacher)


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
    model, tokenizer = checkpoint.load_model(plan.model_dir, dtype=_compute_dtype(options.dtype, options.device),
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

        teacher, teacher_record = load_teacher(options, plan.model_dir, _compute_dtype(options.dtype, options.device),
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


def on_main_process(plan: FinetunePlan, base: LoadedBase, result, on_event: Listener | None):
    """The result with the whole adapter on rank 0. FSDP / ZeRO-3 leave only shards in result.model: after a
    multi-process run the gathered adapters go on a fresh copy of the frozen base (the base never changes, so the
    parent's weights are the full weights): a weightless one when the merge streams (saving the adapter needs only
    the targets' zero hashes, base.parent_zeros), else the parent's full weights reloaded on the CPU."""
    from spp_cli.training.trainer import adapted_copy, adapted_weightless, world_size

    if os.environ.get("ACCELERATE_USE_FSDP") == "true" and not result.parallelism.startswith("fsdp"):
        notify(on_event, "finetune", "warning", f"the launch config asks for FSDP but accelerate ran "
               f"{result.parallelism} (it ignores FSDP on CPU): the result is right, only nothing was sharded")
    if world_size() == 1:
        return result
    dtype = _compute_dtype(plan.options.dtype, "cpu")
    merge_input = _merge_input(plan, dtype)
    if merge_input is not None:
        from spp_cli.stages.streamed_checkpoint import weightless_model

        skeleton = weightless_model(Path(plan.model_path), merge_input.source, dtype,
                                    plan.loading["trust_remote_code"])
        return adapted_weightless(skeleton, result)
    full, _ = checkpoint.load_model(plan.model_dir, dtype=dtype, with_tokenizer=False, **plan.loading)
    return adapted_copy(full, result)


def save_adapter(plan: FinetunePlan, base: LoadedBase, result) -> dict:
    """The adapter (before any merge) and run.json into the work dir; returns run.json's statistics."""
    from spp_cli.training.trainer import save_trained_adapter

    adapter_dir = plan.work_dir / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    save_trained_adapter(result, adapter_dir, base_path=str(Path(plan.model_path).resolve()),
                         base_manifest_sha256=(plan.parent_manifest or {}).get("manifest_sha256"),
                         known_zeros=_known_zeros(plan, base, result.adapter.target_modules()))
    run = _run_record(result)
    (adapter_dir / RUN_RECORD).write_text(json.dumps(run, indent=2) + "\n")
    return run


def _known_zeros(plan: FinetunePlan, base: LoadedBase, targets: list[str]) -> dict[str, str]:
    """The targets' zero hashes as loaded (base.parent_zeros), any other target's read from the parent's shards:
    what a weightless base's adapter records (the frozen weights are the parent's)."""
    missing = [name for name in targets if name not in base.parent_zeros]
    if not missing:
        return base.parent_zeros
    from spp_cli.io.stored_weights import StoredWeights

    stored = StoredWeights(Path(plan.model_path))
    return {**base.parent_zeros, **{name: zeros_sha256(stored[name]) for name in missing}}


def merge_and_check(plan: FinetunePlan, base: LoadedBase, result):
    """(what publish saves, spp.json's "layers"): every pruned tensor, the frozen experts too; a zero-keeping method
    must have kept every zero (CheckFailed). (None, {}) with --no-merge. A local safetensors parent is merged
    streaming from its shards and the saved adapter (a StreamingMerge whose shards are written; the same bytes), any
    other in memory (the merged model in the checkpoint's dtype)."""
    from spp_cli.training.trainer import merge_trained

    if plan.options.no_merge:
        return None, {}
    streaming = _streaming_merge(plan, base, result)
    if streaming is not None:
        return streaming, streaming.run()
    model_out = merge_trained(result).to(base.stored_dtype)
    layers = layers_record(model_out, base.pruned)
    if result.adapter.keeps_zeros:
        check_zeros_kept(model_out, layers, base.parent_zeros, plan.model_path)
    return model_out, layers


def _streaming_merge(plan: FinetunePlan, base: LoadedBase, result):
    """The streaming merge (stages/merge_streaming.py) of the saved adapter into the parent, computing where the
    in-memory merge would (the training device and dtype; the CPU after a multi-process run); None when the parent
    cannot be streamed."""
    from spp_cli.stages.merge_streaming import adapter_merge
    from spp_cli.training.trainer import world_size

    device = plan.options.device if world_size() == 1 else "cpu"
    dtype = _compute_dtype(plan.options.dtype, device)
    merge_input = _merge_input(plan, dtype)
    if merge_input is None:
        return None
    return adapter_merge(merge_input, result.adapter, plan.work_dir / "adapter", plan.work_dir / "merged",
                         plan.fingerprint, pruned=base.pruned, dtype=dtype, device=device)


def _merge_input(plan: FinetunePlan, dtype: str):
    """The parent read lazily for a streaming merge in `dtype` (merge.streamed_base), or None: it cannot stream."""
    from spp_cli.stages.merge import streamed_base

    return streamed_base("auto", plan.model_path, (plan.parent_manifest or {}).get("layers"), dtype)


def record(plan: FinetunePlan, base: LoadedBase, result, layers: dict) -> dict:
    """spp.json: provenance, the layers, the fingerprinted config, the adapter's record and the training curve
    (identical for a resumed and an uninterrupted run: the resume itself is in run.json, not hashed)."""
    parent = plan.parent_manifest or {}
    keeps_zeros = result.adapter.keeps_zeros
    frozen_experts = not_adapted(base.pruned, result.adapter.target_modules())
    warnings = (frozen_experts_warnings(frozen_experts, result.method)
                + _unchanged_merge_warning(layers, plan.parent_manifest, base.stored_dtype))
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


def _unchanged_merge_warning(layers: dict, parent_manifest: dict | None, stored_dtype) -> list[str]:
    """A merge cast back to a low-precision dtype can round every update away (SPP's multipliers 1 + s·β·α stay
    within bf16's 2^-9 after a few steps): say so rather than publish a copy of the parent as a tuned model."""
    parent_layers = (parent_manifest or {}).get("layers") or {}
    if not layers or any(record["weight_sha256"] != parent_layers.get(name, {}).get("weight_sha256")
                         for name, record in layers.items()):
        return []
    return [f"the merged weights are bit-identical to the parent's: every update was rounded away when cast back "
            f"to {str(stored_dtype).removeprefix('torch.')}; train longer or at a higher lr, or keep the adapter "
            "(--no-merge) and merge into a float32 copy"]


def _run_record(result) -> dict:
    """This run's statistics: they differ between identical runs, so they never enter the hashed manifest."""
    from spp_cli.training.trainer import world_size

    return {
        "resumed_from": Path(result.resumed_from).name if result.resumed_from else None,
        "steps_run": result.steps_run,
        "train_seconds": round(result.seconds, 3),  # training only: the held-out evaluations are eval_seconds
        "seconds_per_step": round(result.seconds / result.steps_run, 4) if result.steps_run else None,
        "eval_seconds": round(result.eval_seconds, 3),
        "peak_memory_mb": result.peak_memory_mb,
        "memory_measure": result.memory_measure,
        "parallelism": result.parallelism,
        "processes": world_size(),
    }


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

"""The finetune stage: SPP (or the LoRA baseline) on a pruned model, merge, check every zero, save.

Output layout (DESIGN.md): OUT/ is the merged HF model + spp.json, OUT/adapter/ the adapter. With --no-merge,
OUT/ holds only adapter/ and spp.json; `spp merge` makes the model later with the same checks. Trainer
checkpoints live in a hidden work directory beside OUT until the stage completes, so rerunning the same
command resumes from the last one.
"""

import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from spp_cli import atomic, checkpoint
from spp_cli.environment import resolve_device, versions
from spp_cli.errors import BadInput, CheckFailed
from spp_cli.manifest import layers_record, overall_sparsity, zeros_sha256
from spp_cli.outputs import check_output_path, existing_output, fingerprint

NOT_FINGERPRINTED = ("device", "report_to", "logging_steps", "save_steps", "eval_steps", "save_total_limit")


def _compute_dtype(dtype: str, device: str) -> str:
    """fp32 on CPU; the checkpoint's dtype elsewhere (autocast handles bf16/fp16 on GPUs)."""
    if dtype == "auto" and device == "cpu":
        return "float32"
    return dtype


def finetune(
    model_dir: str,
    out: str | Path,
    *,
    data: str,
    method: str = "spp",
    max_steps: int | None = None,
    epochs: float = 3.0,
    lr: float = 4e-3,
    batch_size: int = 128,
    micro_batch_size: int = 8,
    seqlen: int = 512,
    seed: int = 42,
    groups: int = 16,
    dropout: float = 0.05,
    forward: str = "auto",
    data_format: str = "auto",
    mask_prompt: bool = False,
    gradient_checkpointing: bool = False,
    val_size: int | None = None,
    weight_decay: float = 0.001,
    warmup_ratio: float = 0.03,
    loss_normalization: str = "batch",
    no_merge: bool = False,
    report_to: str = "none",
    save_steps: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    console=None,
) -> dict:
    """Fine-tune `model_dir` on `data` into `out`; returns the manifest. Skips a finished identical output."""
    from spp_cli.adapters.spp import default_targets
    from spp_cli.data.formats import normalize_records
    from spp_cli.data.sources import read_records
    from spp_cli.trainer import (
        FinetuneConfig,
        adapted_copy,
        merge_trained,
        run_finetune,
        save_trained_adapter,
        world_size,
    )

    started = time.time()
    out = Path(out)
    if method not in ("spp", "lora"):
        raise BadInput(f"unknown fine-tuning method '{method}': use spp or lora")
    model_path = checkpoint.resolve_model_path(model_dir)
    parent_manifest = checkpoint.read_manifest(model_path) if Path(model_path).is_dir() else None
    train_config = FinetuneConfig(
        method=method,
        max_steps=max_steps,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        seqlen=seqlen,
        seed=seed,
        groups=groups,
        dropout=dropout,
        forward=forward,
        mask_prompt=mask_prompt,
        gradient_checkpointing=gradient_checkpointing,
        val_size=val_size,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        loss_normalization=loss_normalization,
        report_to=report_to,
        device=resolve_device(device),
        dtype=dtype,
        **({"save_steps": save_steps} if save_steps else {}),
    )
    # what decides the result (the fingerprint): the training options, not where or how often it logs and saves
    options = {
        "data": data,
        "data_format": data_format,
        **{key: value for key, value in asdict(train_config).items() if key not in NOT_FINGERPRINTED},
        "no_merge": no_merge,
        # "auto" trains in fp32 on a CPU but under bf16/fp16 autocast on a GPU: a different result
        "precision": "float32" if train_config.device == "cpu" or dtype == "float32" else f"autocast({dtype})",
    }
    train_config.validate(world_size())  # fail on bad options before anything is loaded
    checkpoint.torch_dtype(dtype)
    stage_fingerprint = fingerprint(options, parent_manifest.get("manifest_sha256") if parent_manifest else model_dir)
    check_output_path(out, [model_path])
    if existing_output(out, stage_fingerprint, overwrite):
        return {**checkpoint.read_manifest(out), "skipped": True}
    # validated and canonical before the model loads: the trainer's build_examples then sees one format a record
    records = normalize_records(read_records(data), data_format, mask_prompt=mask_prompt, source=data)

    model, tokenizer = checkpoint.load_model(
        model_dir,
        dtype=_compute_dtype(dtype, train_config.device),
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    targets = default_targets(model, parent_manifest)
    if parent_manifest is None and console is not None:
        console.print(f"spp: warning: '{model_dir}' has no spp.json: its current zeros define the mask to keep")
    modules = dict(model.named_modules())
    parent_zeros = {name: zeros_sha256(modules[name].weight) for name in targets}

    work_dir = atomic.work_dir(out)
    _claim_work_dir(work_dir, stage_fingerprint)
    try:
        result = run_finetune(model, tokenizer, records, train_config, work_dir, target_names=targets,
                              callbacks=_progress(console, batch_size * seqlen))
    except BadInput:
        if not any(work_dir.glob("checkpoints/checkpoint-*")):
            shutil.rmtree(work_dir, ignore_errors=True)  # nothing to resume: leave nothing behind
        raise
    if not result.is_main_process:
        return {"stage": "finetune", "rank": int(os.environ.get("RANK", "0"))}  # rank 0 merges, checks, saves
    if os.environ.get("ACCELERATE_USE_FSDP") == "true" and not result.parallelism.startswith("fsdp") and console:
        console.print(f"spp: warning: the launch config asks for FSDP but accelerate ran {result.parallelism} "
                      "(it ignores FSDP on CPU): the result is right, only nothing was sharded")
    if world_size() > 1:
        # FSDP / ZeRO-3 leave only shards in result.model: rank 0 puts the gathered adapters on the full
        # frozen base, reloaded on the CPU (the base never changes, so the parent's weights are the full weights)
        base, _ = checkpoint.load_model(
            model_dir,
            dtype=_compute_dtype(dtype, "cpu"),
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
        )
        result.model = adapted_copy(base, result)

    adapter_dir = work_dir / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    save_trained_adapter(
        result,
        adapter_dir,
        base_path=str(Path(model_path).resolve()),
        base_manifest_sha256=parent_manifest.get("manifest_sha256") if parent_manifest else None,
    )
    training = {
        "steps": result.steps,
        "loss_curve": result.train_curve,
        "eval_loss": result.eval_loss,
        "trainable_params": result.trainable_params,
        "resumed_from": Path(result.resumed_from).name if result.resumed_from else None,
        "parallelism": result.parallelism,
        "processes": world_size(),
    }
    manifest = {
        "stage": "finetune",
        "parent": checkpoint.parent_record(model_path, parent_manifest),
        "method": method,
        "pattern": None if method == "lora" else (parent_manifest or {}).get("pattern"),
        "target_sparsity": None if method == "lora" else (parent_manifest or {}).get("target_sparsity"),
        "dense": method == "lora",
        "merged": not no_merge,
        "adapter": asdict(result.spp_config) if result.spp_config else {"peft_type": "LORA", "r": 8, "lora_alpha": 16},
        "training": training,
        "config": options,
        "fingerprint": stage_fingerprint,
        "versions": versions(),
    }
    if no_merge:
        manifest["layers"] = {}
        manifest = _save_adapter_only(out, adapter_dir, manifest, started)
    else:
        model_out = merge_trained(result).to(model.spp_stored_dtype)
        layers = layers_record(model_out, targets)
        if method == "spp":
            check_zeros_kept(model_out, layers, parent_zeros, model_path)
        manifest["layers"] = layers
        manifest["overall_sparsity"] = overall_sparsity(layers)
        manifest = checkpoint.save_checkpoint(
            model_out,
            tokenizer,
            out,
            manifest,
            parent_dir=model_path,
            started=started,
            extra_dirs={"adapter": adapter_dir},
        )
    shutil.rmtree(work_dir, ignore_errors=True)
    return manifest


def _progress(console, tokens_per_step: int) -> list:
    """The console's step lines (none without a console, e.g. from the Python API)."""
    if console is None:
        return []
    from spp_cli.progress import TrainingProgress
    from spp_cli.render import training_progress

    return [TrainingProgress(training_progress(console), tokens_per_step)]


def _claim_work_dir(work_dir: Path, stage_fingerprint: str) -> None:
    """Reuse a work dir only for the same stage (resume); a different run's leftovers are cleared."""
    marker = work_dir / "fingerprint"
    if work_dir.exists() and (not marker.exists() or marker.read_text() != stage_fingerprint):
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(stage_fingerprint)


def check_zeros_kept(model, layers: dict[str, dict], parent_zeros: dict[str, str], parent_dir: str) -> None:
    """Every zero of the parent must still be zero (CheckFailed, exit 1, otherwise). Extra zeros are allowed:
    an fp16 underflow of W·(1 + s·M) can add some, never remove one."""
    changed = [name for name, record in layers.items() if record["zeros_sha256"] != parent_zeros[name]]
    if not changed:
        return
    from spp_cli.stages.verify import open_weights

    # the hashes differ: count lost zeros exactly against the parent's stored weights
    handles = open_weights(Path(parent_dir))
    modules = dict(model.named_modules())
    lost = []
    for name in changed:
        parent = handles[f"{name}.weight"].get_tensor(f"{name}.weight")
        if bool(((parent == 0) & (modules[name].weight.detach().cpu() != 0)).any()):
            lost.append(name)
    if lost:
        raise CheckFailed(f"the merge lost zeros in {len(lost)} layers ({', '.join(lost[:3])}...): not saved")


def _save_adapter_only(out: Path, adapter_dir: Path, manifest: dict, started: float) -> dict:
    with atomic.atomic_dir(out) as staging:
        shutil.copytree(adapter_dir, staging / "adapter")
        finished = checkpoint.finish_manifest(manifest, time.time() - started)
        checkpoint.write_manifest(staging, finished)
    return finished

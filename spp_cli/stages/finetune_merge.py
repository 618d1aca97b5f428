"""The finetune stage after training, on the main process (spp_cli/stages/finetune.py runs these steps in order):

    parent_merge_input  the parent read lazily for the streaming merge, opened once for the two steps that use it
    on_main_process  the whole adapter on rank 0: after a multi-process run the gathered adapters go on a
                     weightless (streaming merge) or reloaded copy of the frozen base
    save_adapter     the adapter and run.json (this run's statistics, not hashed) into the work dir
    merge_and_check  the merge, streaming from the parent's shards where it can, with every zero checked

and `unchanged_merge_warning`, the manifest's warning when a low-precision cast rounded every update away.
"""

import json
import os
import shutil
from pathlib import Path

from spp_cli.events import Listener, notify
from spp_cli.io import checkpoint
from spp_cli.io.manifest import layers_record, zeros_sha256
from spp_cli.stages.finetune_plan import FinetunePlan, LoadedBase, training_dtype
from spp_cli.stages.merge import check_zeros_kept

RUN_RECORD = "run.json"  # in OUT/adapter/: resumed_from, step seconds, peak memory (not hashed)


def parent_merge_input(plan: FinetunePlan):
    """The parent read lazily for a streaming merge (merge_streaming.MergeInput) in the dtype the merge computes
    in, opened once for on_main_process and merge_and_check; None when it cannot stream, or when neither needs it
    (--no-merge on one process)."""
    from spp_cli.stages.merge import streamed_base
    from spp_cli.training.trainer import world_size

    if plan.options.no_merge and world_size() == 1:
        return None
    dtype = training_dtype(plan.options.dtype, _merge_device(plan))
    return streamed_base("auto", plan.model_path, (plan.parent_manifest or {}).get("layers"), dtype)


def _merge_device(plan: FinetunePlan) -> str:
    """Where the merge computes: the training device, the CPU after a multi-process run."""
    from spp_cli.training.trainer import world_size

    return plan.options.device if world_size() == 1 else "cpu"


def on_main_process(plan: FinetunePlan, base: LoadedBase, result, merge_input, on_event: Listener | None):
    """The result with the whole adapter on rank 0. FSDP / ZeRO-3 leave only shards in result.model: after a
    multi-process run the gathered adapters go on a fresh copy of the frozen base (the base never changes, so the
    parent's weights are the full weights): a weightless one when the merge streams (`merge_input`,
    parent_merge_input; saving the adapter needs only the targets' zero hashes, base.parent_zeros), else the
    parent's full weights reloaded on the CPU."""
    from spp_cli.training.result import adapted_copy, adapted_weightless
    from spp_cli.training.trainer import world_size

    if os.environ.get("ACCELERATE_USE_FSDP") == "true" and not result.parallelism.startswith("fsdp"):
        notify(on_event, "finetune", "warning", f"the launch config asks for FSDP but accelerate ran "
               f"{result.parallelism} (it ignores FSDP on CPU): the result is right, only nothing was sharded")
    if world_size() == 1:
        return result
    dtype = training_dtype(plan.options.dtype, "cpu")  # the merge's: it computes on the CPU after several processes
    if merge_input is not None:
        from spp_cli.stages.streamed_checkpoint import weightless_model

        skeleton = weightless_model(Path(plan.model_path), merge_input.source, dtype,
                                    plan.loading["trust_remote_code"])
        return adapted_weightless(skeleton, result)
    full, _ = checkpoint.load_model(plan.model_dir, dtype=dtype, with_tokenizer=False, **plan.loading)
    return adapted_copy(full, result)


def save_adapter(plan: FinetunePlan, base: LoadedBase, result) -> dict:
    """The adapter (before any merge) and run.json into the work dir; returns run.json's statistics."""
    from spp_cli.training.result import save_trained_adapter

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


def merge_and_check(plan: FinetunePlan, base: LoadedBase, result, merge_input):
    """(what publish saves, spp.json's "layers"): every pruned tensor, the frozen experts too; a zero-keeping method
    must have kept every zero (CheckFailed). (None, {}) with --no-merge. A local safetensors parent (`merge_input`,
    parent_merge_input) is merged streaming from its shards and the saved adapter (a StreamingMerge whose shards are
    written; the same bytes), any other in memory (the merged model in the checkpoint's dtype)."""
    from spp_cli.training.result import merge_trained

    if plan.options.no_merge:
        return None, {}
    streaming = _streaming_merge(plan, base, result, merge_input)
    if streaming is not None:
        return streaming, streaming.run()
    model_out = merge_trained(result).to(base.stored_dtype)
    layers = layers_record(model_out, base.pruned)
    if result.adapter.keeps_zeros:
        check_zeros_kept(model_out, layers, base.parent_zeros, plan.model_path)
    return model_out, layers


def _streaming_merge(plan: FinetunePlan, base: LoadedBase, result, merge_input):
    """The streaming merge (stages/merge_streaming.py) of the saved adapter into the parent (`merge_input`, opened in
    the merge's dtype), computing where the in-memory merge would (the training device and dtype; the CPU after a
    multi-process run); None when the parent cannot be streamed."""
    from spp_cli.stages.merge_streaming import adapter_merge

    if merge_input is None:
        return None
    device = _merge_device(plan)
    dtype = training_dtype(plan.options.dtype, device)
    return adapter_merge(merge_input, result.adapter, plan.work_dir / "adapter", plan.work_dir / "merged",
                         plan.fingerprint, pruned=base.pruned, dtype=dtype, device=device)


def unchanged_merge_warning(layers: dict, parent_manifest: dict | None, stored_dtype) -> list[str]:
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

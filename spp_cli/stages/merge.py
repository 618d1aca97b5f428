"""The merge stage (`spp merge`): put a --no-merge adapter (any method) on its base, check every zero, save.

A base that is a local safetensors folder with a spp.json listing its pruned layers is merged streaming
(stages/merge_streaming.py: one parameter in memory at a time); anything else (pickle weights, a base spp did not
write, a model saving cannot stream) loads whole. Both write the same bytes.
"""

import shutil
import tempfile
import time
from pathlib import Path

from spp_cli import interrupts
from spp_cli.errors import BadInput, CheckFailed
from spp_cli.events import Listener
from spp_cli.io import atomic, checkpoint
from spp_cli.io.disk_full import names_output_on_disk_full
from spp_cli.io.manifest import applied_record, layers_record, stage_manifest, zeros_sha256
from spp_cli.io.outputs import check_output_path, existing_output, fingerprint
from spp_cli.memory_plan.stages import announce_merge

MERGE_DTYPE = "float32"  # the merge computes in fp32 and saves in the base's dtype


@names_output_on_disk_full
def merge_adapter(
    adapter_dir: str | Path, out: str | Path, *, overwrite: bool = False, allow_pickle: bool = False,
    streaming: str = "auto", on_event: Listener | None = None,
) -> dict:
    """`spp merge`: load the adapter's base, check its masks, merge, check the zeros, save. `streaming`: auto
    (stream whenever the base allows it), on (insist: BadInput otherwise), off (load the base whole)."""
    from spp_cli.adapters import method_for_peft_type
    from spp_cli.adapters.base import read_adapter_config
    from spp_cli.stages.merge_streaming import file_sha256

    started = time.time()
    adapter_dir, out = Path(adapter_dir), Path(out)
    if (adapter_dir / "adapter").is_dir() and not (adapter_dir / "adapter_config.json").exists():
        adapter_dir = adapter_dir / "adapter"
    config = read_adapter_config(adapter_dir)
    method = method_for_peft_type(config.get("peft_type"))
    base = config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise BadInput(f"the adapter's base model '{base}' is not a directory here: move it back or re-run finetune")
    parent_manifest = checkpoint.read_manifest(base)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise BadInput(f"'{weights}' is missing: the adapter directory is incomplete")
    # the adapter's content, not its location, decides the result (identical runs, identical manifests)
    options = {"adapter_sha256": file_sha256(weights)}
    stage_fingerprint = fingerprint(options, config.get("base_manifest_sha256"))
    check_output_path(out, [base, adapter_dir])
    if existing_output(out, stage_fingerprint, overwrite):
        return {**checkpoint.read_manifest(out), "skipped": True}
    announce_merge(on_event, base, adapter_dir, streaming, out)
    merge = dict(adapter_dir=adapter_dir, out=out, method=method.name, config=config, base=base,
                 parent_manifest=parent_manifest, options=options, fingerprint=stage_fingerprint, started=started)
    merge_input = streamed_base(streaming, base, (parent_manifest or {}).get("layers"))
    if merge_input is None:
        merged = _merge_in_memory(**merge, allow_pickle=allow_pickle)
    else:
        merged = _merge_streaming(**merge, merge_input=merge_input, on_event=on_event)
    interrupts.output_published()  # OUT/ is in place: the run is done (spp_cli/interrupts.py)
    return merged


def streamed_base(streaming: str, base: str, pruned: dict | None, dtype: str = MERGE_DTYPE):
    """The base read lazily for a streaming merge (merge_streaming.MergeInput), or None for the in-memory path: a
    merge streams when `streaming` (auto/on/off) allows it and the base is a local safetensors folder whose spp.json
    lists its pruned layers. BadInput when `streaming` is "on" and it cannot."""
    from spp_cli.stages.merge_streaming import NotStreamable, open_merge_input
    from spp_cli.stages.prune_streaming import wants_streaming

    if streaming not in ("auto", "on", "off"):
        raise BadInput(f"streaming: '{streaming}' is not one of auto, on, off")
    if not wants_streaming(streaming, base):
        return None
    try:
        if not pruned:
            raise NotStreamable("its spp.json lists no pruned layers (they are found in the loaded weights)")
        return open_merge_input(base, dtype)
    except NotStreamable as reason:
        if streaming == "on":
            raise BadInput(f"--streaming on cannot merge this model tensor by tensor: {reason}; "
                           "use --streaming auto") from None
        return None


def _merge_in_memory(*, adapter_dir: Path, out: Path, method: str, config: dict, base: str,
                     parent_manifest: dict | None, options: dict, fingerprint: str, started: float,
                     allow_pickle: bool) -> dict:
    from pruners.experts import weight_of
    from spp_cli.adapters import adapter_class
    from spp_cli.adapters.base import default_targets, fitting_layers

    model, tokenizer = checkpoint.load_model(base, dtype=MERGE_DTYPE, allow_pickle=allow_pickle)
    stored_dtype = model.spp_stored_dtype
    # the layers finetune recorded: the base's pruned ones, fused MoE experts (frozen, not adapted) included
    pruned = default_targets(model, parent_manifest)
    # before loading: masked-full's adapter state is the target weights themselves
    parent_zeros = {name: zeros_sha256(weight_of(model, name)) for name in pruned}
    # the adapter's shapes against the base's before anything is injected or merged (one line on a mismatch)
    fitting_layers(adapter_class(method).from_file_record(config), adapter_dir / "adapter_model.safetensors",
                   {name: tuple(parameter.shape) for name, parameter in model.named_parameters()})
    adapter, adapted = adapter_class(method).load(model, adapter_dir)
    model = adapter.merge(adapted).to(stored_dtype)
    layers = layers_record(model, pruned)
    if adapter.keeps_zeros:
        check_zeros_kept(model, layers, parent_zeros, base)
    manifest = merge_manifest(adapter, pruned, layers, adapter_dir, base, parent_manifest, options, fingerprint,
                              stored_dtype)
    with tempfile.TemporaryDirectory() as scratch:
        adapter_copy = Path(scratch) / "adapter"
        shutil.copytree(adapter_dir, adapter_copy)
        return checkpoint.save_checkpoint(
            model, tokenizer, out, manifest, parent_dir=base, started=started, extra_dirs={"adapter": adapter_copy}
        )


def _merge_streaming(*, adapter_dir: Path, out: Path, method: str, config: dict, base: str,
                     parent_manifest: dict, options: dict, fingerprint: str, started: float, merge_input,
                     on_event: Listener | None) -> dict:
    from spp_cli.adapters import adapter_class
    from spp_cli.stages.merge_streaming import adapter_merge

    adapter = adapter_class(method).from_file_record(config)
    pruned = list(parent_manifest["layers"])
    merge = adapter_merge(merge_input, adapter, adapter_dir, atomic.work_dir(out), fingerprint, pruned=pruned,
                          dtype=MERGE_DTYPE)
    layers = merge.run(on_event)
    manifest = merge_manifest(adapter, pruned, layers, adapter_dir, base, parent_manifest, options, fingerprint,
                              merge_input.stored_dtype)
    tokenizer = checkpoint.load_tokenizer(base)
    return merge.publish(out, manifest, tokenizer, started, extra_dirs={"adapter": adapter_dir})


def merge_manifest(adapter, pruned: list[str], layers: dict, adapter_dir: Path, base: str,
                   parent_manifest: dict | None, options: dict, stage_fingerprint: str, stored_dtype) -> dict:
    """spp.json of a merge: the parent, the layers, the adapter's record and the finetune stage's training."""
    finetune_manifest = checkpoint.read_manifest(adapter_dir.parent) or {}
    frozen_experts = not_adapted(pruned, adapter.target_modules())
    parent = parent_manifest or {}
    return stage_manifest(
        "merge",
        parent=checkpoint.parent_record(base, parent_manifest),
        method=adapter.name,
        pattern=parent.get("pattern") if adapter.keeps_zeros else None,
        target_sparsity=parent.get("target_sparsity") if adapter.keeps_zeros else None,
        dense=not adapter.keeps_zeros,
        layers=layers,
        config=options,
        # merged on the CPU in float32; "finetune": what the run that trained the adapter applied
        applied=applied_record(device="cpu", compute_dtype=MERGE_DTYPE, stored_dtype=stored_dtype,
                               finetune=finetune_manifest.get("applied")),
        fingerprint=stage_fingerprint,
        merged=True,
        adapter=adapter.record(),
        training=finetune_manifest.get("training"),
        **({"frozen_experts": len(frozen_experts)} if frozen_experts else {}),
        **({"warnings": frozen_experts_warnings(frozen_experts, adapter.name)} if frozen_experts else {}),
    )


def not_adapted(pruned: list[str], adapted: list[str]) -> list[str]:
    """The pruned layers the adapter left frozen: fused MoE expert slices (adapters/base.split_fused_experts) that
    its method cannot wrap, or a fused parameter masked-full found only partly pruned."""
    adapted = set(adapted)
    return [name for name in pruned if name not in adapted]


def frozen_experts_warnings(frozen_experts: list[str], method: str) -> list[str]:
    """What not_adapted found, said rather than hidden (one line on the console, and in spp.json)."""
    if not frozen_experts:
        return []
    return [f"experts: {len(frozen_experts)} fused expert projections are not adapted (--method {method} has no "
            "form for fused experts; spp and masked-full have); they stay frozen and keep their zeros"]


def check_zeros_kept(model, layers: dict[str, dict], parent_zeros: dict[str, str], parent_dir: str) -> None:
    """Every zero of the parent must still be zero (CheckFailed, exit 1, otherwise). Extra zeros are allowed:
    an fp16 underflow of W·(1 + s·M) can add some, never remove one."""
    changed = [name for name, record in layers.items() if record["zeros_sha256"] != parent_zeros[name]]
    if not changed:
        return
    from pruners.experts import weight_of
    from spp_cli.io.stored_weights import StoredWeights

    # the hashes differ: count lost zeros exactly against the parent's stored weights
    stored = StoredWeights(Path(parent_dir))
    lost = []
    for name in changed:
        if bool(((stored[name] == 0) & (weight_of(model, name).detach().cpu() != 0)).any()):
            lost.append(name)
    if lost:
        raise CheckFailed(f"the merge lost zeros in {len(lost)} layers ({', '.join(lost[:3])}...): not saved")

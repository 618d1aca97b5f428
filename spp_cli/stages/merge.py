"""The merge stage (`spp merge`): put a --no-merge adapter (any method) on its base, check every zero, save."""

import hashlib
import shutil
import tempfile
import time
from pathlib import Path

from spp_cli.errors import BadInput
from spp_cli.io import checkpoint
from spp_cli.io.disk_full import names_output_on_disk_full
from spp_cli.io.manifest import layers_record, stage_manifest, zeros_sha256
from spp_cli.io.outputs import check_output_path, existing_output, fingerprint
from spp_cli.stages.finetune import check_zeros_kept, frozen_experts_warnings, not_adapted


@names_output_on_disk_full
def merge_adapter(
    adapter_dir: str | Path, out: str | Path, *, overwrite: bool = False, allow_pickle: bool = False
) -> dict:
    """`spp merge`: load the adapter's base, check its masks, merge, check the zeros, save."""
    from pruners.experts import weight_of
    from spp_cli.adapters import adapter_class, method_for_peft_type
    from spp_cli.adapters.base import default_targets, read_adapter_config

    started = time.time()
    adapter_dir, out = Path(adapter_dir), Path(out)
    if (adapter_dir / "adapter").is_dir() and not (adapter_dir / "adapter_config.json").exists():
        adapter_dir = adapter_dir / "adapter"
    config = read_adapter_config(adapter_dir)
    method = method_for_peft_type(config.get("peft_type"))
    base = config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise BadInput(f"the adapter's base model '{base}' is not a directory here: move it back or re-run finetune")
    finetune_manifest = checkpoint.read_manifest(adapter_dir.parent) or {}
    parent_manifest = checkpoint.read_manifest(base)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise BadInput(f"'{weights}' is missing: the adapter directory is incomplete")
    # the adapter's content, not its location, decides the result (identical runs, identical manifests)
    options = {"adapter_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    stage_fingerprint = fingerprint(options, config.get("base_manifest_sha256"))
    check_output_path(out, [base, adapter_dir])
    if existing_output(out, stage_fingerprint, overwrite):
        return {**checkpoint.read_manifest(out), "skipped": True}
    model, tokenizer = checkpoint.load_model(base, dtype="float32", allow_pickle=allow_pickle)
    stored_dtype = model.spp_stored_dtype
    # the layers finetune recorded: the base's pruned ones, fused MoE experts (frozen, not adapted) included
    pruned = default_targets(model, parent_manifest)
    # before loading: masked-full's adapter state is the target weights themselves
    parent_zeros = {name: zeros_sha256(weight_of(model, name)) for name in pruned}
    adapter, adapted = adapter_class(method.name).load(model, adapter_dir)
    frozen_experts = not_adapted(pruned, adapter.target_modules())
    model = adapter.merge(adapted).to(stored_dtype)
    layers = layers_record(model, pruned)
    if adapter.keeps_zeros:
        check_zeros_kept(model, layers, parent_zeros, base)
    manifest = stage_manifest(
        "merge",
        parent=checkpoint.parent_record(base, parent_manifest),
        method=method.name,
        pattern=(parent_manifest or {}).get("pattern") if adapter.keeps_zeros else None,
        target_sparsity=(parent_manifest or {}).get("target_sparsity") if adapter.keeps_zeros else None,
        dense=not adapter.keeps_zeros,
        layers=layers,
        config=options,
        fingerprint=stage_fingerprint,
        merged=True,
        adapter=adapter.record(),
        training=finetune_manifest.get("training"),
        **({"frozen_experts": len(frozen_experts)} if frozen_experts else {}),
        **({"warnings": frozen_experts_warnings(frozen_experts, method.name)} if frozen_experts else {}),
    )
    with tempfile.TemporaryDirectory() as scratch:
        adapter_copy = Path(scratch) / "adapter"
        shutil.copytree(adapter_dir, adapter_copy)
        return checkpoint.save_checkpoint(
            model, tokenizer, out, manifest, parent_dir=base, started=started, extra_dirs={"adapter": adapter_copy}
        )

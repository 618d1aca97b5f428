"""The merge stage (`spp merge`): put a --no-merge SPP adapter on its base, check every zero, save."""

import hashlib
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from spp_cli import checkpoint
from spp_cli.environment import versions
from spp_cli.errors import BadInput
from spp_cli.manifest import layers_record, overall_sparsity, zeros_sha256
from spp_cli.outputs import check_output_path, existing_output, fingerprint
from spp_cli.stages.finetune import check_zeros_kept


def merge_adapter(
    adapter_dir: str | Path, out: str | Path, *, overwrite: bool = False, allow_pickle: bool = False
) -> dict:
    """`spp merge`: load the adapter's base, check its masks, merge, check the zeros, save."""
    from spp_cli.adapters.spp import merge_spp
    from spp_cli.adapters.spp_files import load_spp_adapter, read_adapter_config

    started = time.time()
    adapter_dir, out = Path(adapter_dir), Path(out)
    if (adapter_dir / "adapter").is_dir() and not (adapter_dir / "adapter_config.json").exists():
        adapter_dir = adapter_dir / "adapter"
    config = read_adapter_config(adapter_dir)
    base = config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise BadInput(f"the adapter's base model '{base}' is not a directory here: move it back or re-run finetune")
    stage_manifest = checkpoint.read_manifest(adapter_dir.parent) or {}
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
    modules = dict(model.named_modules())
    spp_config = load_spp_adapter(model, adapter_dir)
    targets = list(spp_config.target_modules)
    parent_zeros = {name: zeros_sha256(modules[name].weight) for name in targets}
    merge_spp(model)
    model.to(model.spp_stored_dtype)
    layers = layers_record(model, targets)
    check_zeros_kept(model, layers, parent_zeros, base)
    manifest = {
        "stage": "merge",
        "parent": checkpoint.parent_record(base, parent_manifest),
        "method": "spp",
        "pattern": (parent_manifest or {}).get("pattern"),
        "target_sparsity": (parent_manifest or {}).get("target_sparsity"),
        "dense": False,
        "merged": True,
        "adapter": asdict(spp_config),
        "training": stage_manifest.get("training"),
        "layers": layers,
        "overall_sparsity": overall_sparsity(layers),
        "config": options,
        "fingerprint": stage_fingerprint,
        "versions": versions(),
    }
    with tempfile.TemporaryDirectory() as scratch:
        adapter_copy = Path(scratch) / "adapter"
        shutil.copytree(adapter_dir, adapter_copy)
        return checkpoint.save_checkpoint(
            model, tokenizer, out, manifest, parent_dir=base, started=started, extra_dirs={"adapter": adapter_copy}
        )

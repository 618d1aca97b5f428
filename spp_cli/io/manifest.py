"""The spp.json manifest's content (DESIGN.md, Checkpoint): per-layer records with the hashes of a weight's zero
set and values, what a run applied, and the one builder of a stage's manifest."""

import hashlib

import numpy as np
import torch


def zeros_sha256(weight: torch.Tensor) -> str:
    """sha256 of the row-major boolean zero mask of `weight`, packed with numpy.packbits."""
    zero_mask = (weight.detach() == 0).cpu().contiguous().numpy()
    return hashlib.sha256(np.packbits(zero_mask.reshape(-1)).tobytes()).hexdigest()


def weight_sha256(weight: torch.Tensor) -> str:
    """sha256 of the weight's raw bytes in its own dtype (row-major)."""
    raw = weight.detach().cpu().contiguous().view(torch.uint8).numpy()
    return hashlib.sha256(raw.tobytes()).hexdigest()


def layer_record(weight: torch.Tensor) -> dict:
    """The manifest's entry for one prunable linear: shape, sparsity, zeros and weight hashes."""
    return {
        "shape": list(weight.shape),
        "sparsity": round(float((weight == 0).sum()) / weight.numel(), 6),
        "zeros_sha256": zeros_sha256(weight),
        "weight_sha256": weight_sha256(weight),
    }


def layers_record(model: torch.nn.Module, names: list[str]) -> dict[str, dict]:
    """name -> layer_record for each named linear: a module's weight, or an expert slice of fused MoE experts."""
    from pruners.experts import weight_of

    return {name: layer_record(weight_of(model, name)) for name in names}


def overall_sparsity(layers: dict[str, dict]) -> float:
    """Zeros over weights of the prunable linears only (embeddings, lm_head and norms are never pruned)."""
    total = sum(record["shape"][0] * record["shape"][1] for record in layers.values())
    zeros = sum(record["sparsity"] * record["shape"][0] * record["shape"][1] for record in layers.values())
    return round(zeros / total, 6) if total else 0.0


def dtype_name(dtype) -> str | None:
    """A dtype's name: torch.float32 -> "float32"; a name passes through, None stays None."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def applied_record(*, device: str, compute_dtype, stored_dtype, **resolved) -> dict:
    """spp.json's "applied": what this run resolved and used, beside "config" (what was asked, e.g. "auto"):
    the device, the dtype it computed in and the dtype it stored, then the stage's own resolved values (seqlen,
    lr, data_format, template, ...). Left out of manifest_sha256 (checkpoint.UNHASHED_KEYS): the device is this
    machine's."""
    return {"device": str(device), "dtype": {"compute": dtype_name(compute_dtype), "stored": dtype_name(stored_dtype)},
            **resolved}


def stage_manifest(
    stage: str,
    *,
    parent: dict,
    method: str,
    pattern: str | None,
    target_sparsity: float | None,
    dense: bool,
    layers: dict[str, dict],
    config: dict,
    fingerprint: str,
    applied: dict | None = None,
    **details,
) -> dict:
    """A stage's spp.json before checkpoint.finish_manifest adds its hash and times. `applied` is applied_record's
    (what the run resolved, beside `config`, what was asked); `details` are the stage's own keys (damping, adapter,
    training, merged, ...); an output without weights (an adapter alone) has no layers and so no overall_sparsity."""
    from spp_cli.environment import versions

    manifest = {
        "stage": stage,
        "parent": parent,
        "method": method,
        "pattern": pattern,
        "target_sparsity": target_sparsity,
        "dense": dense,
        "layers": layers,
    }
    if layers:
        manifest["overall_sparsity"] = overall_sparsity(layers)
    return {**manifest, **details, "config": config, **({"applied": applied} if applied is not None else {}),
            "fingerprint": fingerprint, "versions": versions()}

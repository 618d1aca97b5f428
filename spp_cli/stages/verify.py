"""`spp verify`: does a checkpoint still have the zeros its spp.json declares?

Reads the weights straight from the safetensors files (no model is built; an expert of fused MoE experts is read
from wherever its checkpoint stores it: spp_cli/io/stored_weights.py), then per pruned layer checks
- the declared N:M pattern (every group of M inputs in a row has at least N zeros),
- the zero set against spp.json's `zeros_sha256`,
- with a parent: lost zeros (a parent zero that is now nonzero: a violation) and extra zeros (counted, allowed).
"""

from pathlib import Path

import torch

from spp_cli.errors import BadInput
from spp_cli.io.checkpoint import read_manifest
from spp_cli.io.manifest import zeros_sha256
from spp_cli.io.stored_weights import StoredWeights


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """How many groups of M consecutive inputs (per row) hold fewer than N zeros."""
    rows, columns = weight.shape
    if columns % m:
        return rows * (columns // m + 1)
    zeros_per_group = (weight.reshape(rows, columns // m, m) == 0).sum(dim=-1)
    return int((zeros_per_group < n).sum())


def parent_weight(parent: StoredWeights, name: str, directory: Path) -> torch.Tensor:
    """The --against model's weight of layer `name`; a parent without that layer is another model, not a broken
    checkpoint (e.g. an OPT model against a LLaMA prune: `model.decoder.layers.*` vs `model.layers.*`)."""
    try:
        return parent[name]
    except BadInput:
        example = next((key.removesuffix(".weight") for key in parent.handles if key.endswith("proj.weight")),
                       next(iter(parent.handles)))
        raise BadInput(f"--against '{parent.directory}' has no layer '{name}' (its layers are named like "
                       f"'{example}'): it is not the model '{directory}' was made from; give that model's "
                       "directory") from None


def verify_checkpoint(directory: str | Path, against: str | Path | None = None) -> dict:
    """Check `directory` (and optionally that it kept every zero of `against`). Returns a report; `ok` says it all."""
    directory = Path(directory)
    manifest = read_manifest(directory) if directory.is_dir() else None
    if manifest is None:
        raise BadInput(f"'{directory}' has no spp.json: verify a directory written by spp prune/finetune")
    pattern = manifest.get("pattern") or "unstructured"
    dense = bool(manifest.get("dense"))  # a LoRA merge: no pattern to hold (its zeros are gone by design)
    n, m = map(int, pattern.split(":")) if ":" in pattern and not dense else (None, None)
    stored = StoredWeights(directory)
    parent_stored = None
    if against is not None:
        against = Path(against)
        if not against.is_dir():
            raise BadInput(f"--against '{against}' is not a directory: give the parent model directory")
        parent_stored = StoredWeights(against)
    layers, problems = {}, []
    for name, record in manifest.get("layers", {}).items():
        weight = stored[name]
        entry = {"sparsity": round(float((weight == 0).float().mean()), 6)}
        if n is not None:
            entry["broken_groups"] = nm_violations(weight, n, m)
            if entry["broken_groups"]:
                problems.append(f"{name}: {entry['broken_groups']} groups break {pattern}")
        entry["zeros_match_manifest"] = zeros_sha256(weight) == record.get("zeros_sha256")
        if parent_stored is not None:
            parent = parent_weight(parent_stored, name, directory)
            if parent.shape != weight.shape:
                raise BadInput(f"{name}: shape {list(weight.shape)} differs from the parent's {list(parent.shape)}")
            entry["lost_zeros"] = int(((parent == 0) & (weight != 0)).sum())
            entry["extra_zeros"] = int(((parent != 0) & (weight == 0)).sum())
            if entry["lost_zeros"]:
                problems.append(f"{name}: {entry['lost_zeros']} zeros of the parent are nonzero")
        elif not entry["zeros_match_manifest"]:
            problems.append(f"{name}: zero set differs from spp.json")
        layers[name] = entry
    return {
        "directory": str(directory),
        "against": str(against) if against is not None else None,
        "pattern": pattern,
        "dense": bool(manifest.get("dense")),
        "layers_checked": len(layers),
        "lost_zeros": sum(entry.get("lost_zeros", 0) for entry in layers.values()),
        "extra_zeros": sum(entry.get("extra_zeros", 0) for entry in layers.values()),
        "broken_groups": sum(entry.get("broken_groups", 0) for entry in layers.values()),
        "problems": problems,
        "ok": not problems,
        "layers": layers,
    }

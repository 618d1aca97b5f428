"""The prune stage: load a model, draw calibration windows, prune block by block, save a checkpoint + spp.json."""

import time
from collections.abc import Callable
from pathlib import Path

from spp_cli import checkpoint
from spp_cli.environment import resolve_device, versions
from spp_cli.errors import BadInput, RuntimeFailure
from spp_cli.outputs import check_output_path, existing_output, fingerprint

DEFAULT_MAX_SEQLEN = 2048  # spec/pruners.md §6 pitfall 4: never default to a 128k max_position_embeddings


def default_seqlen(config) -> int:
    return min(DEFAULT_MAX_SEQLEN, getattr(config, "max_position_embeddings", DEFAULT_MAX_SEQLEN) or DEFAULT_MAX_SEQLEN)


def check_seqlen(seqlen: int | None, config) -> int:
    """The seqlen to use: explicit, or min(2048, max_position_embeddings); never beyond the model's positions."""
    limit = getattr(config, "max_position_embeddings", None)
    if seqlen is None:
        return default_seqlen(config)
    if seqlen < 2:
        raise BadInput(f"seqlen {seqlen} is too small: use at least 2 tokens")
    if limit and seqlen > limit:
        raise BadInput(f"seqlen {seqlen} is beyond the model's {limit} positions: use --seqlen {limit} or less")
    return seqlen


def parse_options(method: str, sparsity: float | None, pattern: str):
    """Validate the method and pattern with the pruners' own rules; one line on failure."""
    from pruners import PRUNERS
    from pruners.masks import PatternError, parse_pattern

    if method not in PRUNERS:
        raise BadInput(f"unknown pruning method '{method}': use one of {', '.join(PRUNERS)}")
    try:
        return parse_pattern(pattern, sparsity)
    except PatternError as error:
        raise BadInput(str(error)) from None


def prune(
    model: str,
    out: str | Path,
    *,
    method: str,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    calib: str = "c4",
    nsamples: int = 128,
    seqlen: int | None = None,
    seed: int = 0,
    targets: str | None = None,
    ignore: str | None = None,
    use_variant: bool = False,
    true_sequential: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    on_block: Callable | None = None,
) -> dict:
    """Prune `model` one-shot into `out` (an HF directory with exact zeros + spp.json). Returns the manifest.

    Skips the work when `out` already holds the same result (same options and parent).
    """
    from pruners import CholeskyError
    from pruners.masks import PatternError
    from pruners.sequential import PrunerOptionError, UnsupportedModelError, prune_model

    started = time.time()
    out = Path(out)
    sparsity_pattern = parse_options(method, sparsity, pattern)
    if nsamples < 1 and method != "magnitude":
        raise BadInput(f"nsamples {nsamples} is invalid: use at least 1 calibration window")
    if method == "magnitude" and use_variant:
        raise BadInput("--use-variant is a Wanda option: drop it or use --method wanda")
    if true_sequential and method != "sparsegpt":
        raise BadInput("--true-sequential is a SparseGPT option: drop it or use --method sparsegpt")
    compute_device = resolve_device(device)
    checkpoint.torch_dtype(dtype)
    model_path = checkpoint.resolve_model_path(model)
    parent_manifest = checkpoint.read_manifest(model_path) if Path(model_path).is_dir() else None
    options = {
        "method": method,
        "sparsity": sparsity_pattern.sparsity,
        "pattern": str(sparsity_pattern),
        "calib": None if method == "magnitude" else calib,
        "nsamples": None if method == "magnitude" else nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "targets": targets,
        "ignore": ignore,
        "use_variant": use_variant,
        "true_sequential": true_sequential,
        "dtype": dtype,
    }
    stage_fingerprint = fingerprint(options, parent_manifest.get("manifest_sha256") if parent_manifest else model)
    check_output_path(out, [model_path])
    if existing_output(out, stage_fingerprint, overwrite):
        return {**checkpoint.read_manifest(out), "skipped": True}

    checkpoint.check_model(model, allow_pickle)
    calibration_texts = None
    if method != "magnitude":
        from spp_cli.data.sources import read_texts

        calibration_texts = read_texts(calib)  # a bad source fails before a large model is loaded
    loaded, tokenizer = checkpoint.load_model(
        model, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    options["seqlen"] = check_seqlen(seqlen, loaded.config) if method != "magnitude" else None
    calibration = None
    if method != "magnitude":
        from spp_cli.data.sources import calibration_windows

        calibration = calibration_windows(tokenizer, calib, nsamples, options["seqlen"], seed, calibration_texts)
    try:
        reports = prune_model(
            loaded,
            calibration,
            method,
            sparsity_pattern,
            targets=targets,
            ignore=ignore,
            device=compute_device,
            true_sequential=true_sequential,
            use_variant=use_variant,
            on_block=on_block,
        )
    except (PatternError, PrunerOptionError, UnsupportedModelError) as error:
        raise BadInput(str(error)) from None
    except CholeskyError as error:
        raise RuntimeFailure(f"SparseGPT failed: {error}; try more calibration windows (--nsamples)") from None
    loaded.to(loaded.spp_stored_dtype)
    names = [report.name for report in reports]
    layers = checkpoint.layers_record(loaded, names)
    manifest = {
        "stage": "prune",
        "parent": checkpoint.parent_record(model_path if Path(model_path).exists() else model, parent_manifest),
        "method": method,
        "pattern": str(sparsity_pattern),
        "target_sparsity": sparsity_pattern.sparsity,
        "overall_sparsity": checkpoint.overall_sparsity(layers),
        "layers": layers,
        "dense": False,
        "damping": {r.name: r.damping for r in reports if r.damping is not None and r.damping > 0.01 + 1e-12},
        "config": options,
        "fingerprint": stage_fingerprint,
        "versions": versions(),
    }
    return checkpoint.save_checkpoint(
        loaded, tokenizer, out, manifest, parent_dir=model_path if Path(model_path).is_dir() else None, started=started
    )

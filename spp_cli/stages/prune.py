"""The prune stage: load a model, draw calibration windows, prune block by block, save a checkpoint + spp.json."""

import time
from collections.abc import Callable
from pathlib import Path

from spp_cli import checkpoint
from spp_cli.environment import resolve_device
from spp_cli.errors import BadInput, RuntimeFailure
from spp_cli.manifest import layers_record, stage_manifest
from spp_cli.outputs import check_output_path, existing_output, fingerprint
from spp_cli.recipe import validate_options
from spp_cli.recipe_schema import PruneStage


def parse_pattern(pattern: str, sparsity: float):
    """The pruners' SparsityPattern for a validated pattern and sparsity."""
    from pruners.masks import PatternError, parse_pattern

    try:
        return parse_pattern(pattern, sparsity)
    except PatternError as error:
        raise BadInput(str(error)) from None


def prune(
    model: str,
    out: str | Path,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    on_block: Callable | None = None,
    **options,
) -> dict:
    """Prune `model` one-shot into `out` (an HF directory with exact zeros + spp.json). Returns the manifest.

    `options` are the prune stage's recipe keys (spp_cli/recipe_schema.py, PruneStage): method, sparsity, pattern,
    calib, nsamples, seqlen, seed, ... Skips the work when `out` already holds the same result (same options and
    parent).
    """
    from pruners import CholeskyError
    from pruners.masks import PatternError
    from pruners.sequential import PrunerOptionError, UnsupportedModelError, prune_model

    started = time.time()
    out = Path(out)
    stage = validate_options(PruneStage, options)
    method, calib, nsamples, seed = stage.method, stage.calib, stage.nsamples, stage.seed
    sparsity_pattern = parse_pattern(stage.pattern, stage.sparsity)
    compute_device = resolve_device(stage.device)
    dtype = stage.dtype
    checkpoint.torch_dtype(dtype)
    model_path = checkpoint.resolve_model_path(model)
    parent_manifest = checkpoint.model_manifest(model)
    options = {
        "method": method,
        "sparsity": sparsity_pattern.sparsity,
        "pattern": str(sparsity_pattern),
        "calib": None if method == "magnitude" else calib,
        "nsamples": None if method == "magnitude" else nsamples,
        "seqlen": stage.seqlen,
        "seed": seed,
        "targets": stage.targets,
        "ignore": stage.ignore,
        "use_variant": stage.use_variant,
        "true_sequential": stage.true_sequential,
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
    options["seqlen"] = checkpoint.resolve_seqlen(loaded.config, stage.seqlen) if method != "magnitude" else None
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
            targets=stage.targets,
            ignore=stage.ignore,
            device=compute_device,
            true_sequential=stage.true_sequential,
            use_variant=stage.use_variant,
            on_block=on_block,
        )
    except (PatternError, PrunerOptionError, UnsupportedModelError) as error:
        raise BadInput(str(error)) from None
    except CholeskyError as error:
        raise RuntimeFailure(f"SparseGPT failed: {error}; try more calibration windows (--nsamples)") from None
    loaded.to(loaded.spp_stored_dtype)
    manifest = stage_manifest(
        "prune",
        parent=checkpoint.parent_record(model_path if Path(model_path).exists() else model, parent_manifest),
        method=method,
        pattern=str(sparsity_pattern),
        target_sparsity=sparsity_pattern.sparsity,
        dense=False,
        layers=layers_record(loaded, [report.name for report in reports]),
        damping={r.name: r.damping for r in reports if r.damping is not None and r.damping > 0.01 + 1e-12},
        config=options,
        fingerprint=stage_fingerprint,
    )
    return checkpoint.save_checkpoint(
        loaded, tokenizer, out, manifest, parent_dir=model_path if Path(model_path).is_dir() else None, started=started
    )

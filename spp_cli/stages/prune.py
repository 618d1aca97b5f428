"""The prune stage: load a model, draw calibration windows, prune block by block, save a checkpoint + spp.json.

Two paths give bit-identical outputs. Streaming (prune_streaming.py: a local directory of safetensors, the default)
holds one block at a time and resumes a killed run at its next block; in memory (hub ids, pickle weights, OWL, or
`streaming="off"`) loads the whole model first and saves it at the end.
"""

import time
from collections.abc import Callable
from pathlib import Path

from spp_cli import checkpoint, preflight
from spp_cli.environment import resolve_device
from spp_cli.errors import BadInput, RuntimeFailure
from spp_cli.manifest import layer_record, stage_manifest
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


def owl_blocks(blocks_seen: list, store) -> dict[int, tuple[float, float]]:
    """Block index -> (OWL sparsity, outlier ratio) of every pruned block: from the profile a streamed run keeps
    (which covers the blocks a killed run pruned before this one resumed it), else from this run's BlockReports."""
    profile = store.saved_owl_profile() if store is not None else None
    if profile is None:
        return {b.index: (b.sparsity, b.outlier_ratio) for b in blocks_seen}
    return {index: (sparsity, ratio) for index, (sparsity, ratio)
            in enumerate(zip(profile.sparsities, profile.outlier_ratios, strict=True)) if sparsity is not None}


def new_option_records(stage: PruneStage, owl: dict[int, tuple[float, float]], reports: list) -> dict:
    """spp.json entries for OWL (each block's outlier ratio and sparsity), DSnoT and MoE fallbacks, when used."""
    records = {}
    if stage.sparsity_profile == "owl":
        records["sparsity_profile"] = {
            "profile": "owl", "threshold": stage.owl_threshold, "lambda": stage.owl_lambda,
            "layer_sparsity": {str(index): round(sparsity, 8) for index, (sparsity, _) in owl.items()},
            "outlier_ratio": {str(index): round(ratio, 8) for index, (_, ratio) in owl.items()},
        }
    if stage.refine != "none":
        records["refine"] = stage.refine
    fallbacks = {r.name: {"method": r.fallback, "tokens": r.tokens} for r in reports if r.fallback}
    if fallbacks:
        records["expert_fallbacks"] = fallbacks
        records["warnings"] = [
            f"{len(fallbacks)} expert linear(s) saw fewer than {stage.min_expert_tokens} calibration tokens and were "
            "pruned by magnitude (see expert_fallbacks): use more calibration windows (--nsamples)"
        ]
    return records


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
    parent). `streaming` is not an option of the result (both paths write the same bytes), so it stays out of the
    fingerprint. A streamed run that resumed a killed one returns "resumed_from_block": the first block it pruned.
    """
    from pruners import CholeskyError
    from pruners.experts import weight_of
    from pruners.masks import PatternError
    from pruners.sequential import PrunerOptionError, UnsupportedModelError, prune_model
    from spp_cli.stages import prune_streaming

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
    needs_calibration = method != "magnitude" or stage.sparsity_profile == "owl"  # OWL's outlier ratios need data
    options = {
        "method": method,
        "sparsity": sparsity_pattern.sparsity,
        "pattern": str(sparsity_pattern),
        "calib": calib if needs_calibration else None,
        "nsamples": nsamples if needs_calibration else None,
        "seqlen": stage.seqlen,
        "seed": seed,
        "targets": stage.targets,
        "ignore": stage.ignore,
        "use_variant": stage.use_variant,
        "true_sequential": stage.true_sequential,
        "dtype": dtype,
    }
    # recorded only when used, so the fingerprints (and manifests) of earlier runs stay what they were
    if stage.sparsity_profile != "uniform":
        options |= {"sparsity_profile": stage.sparsity_profile, "owl_threshold": stage.owl_threshold,
                    "owl_lambda": stage.owl_lambda}
    if stage.refine != "none":
        options["refine"] = stage.refine
    if stage.min_expert_tokens != 16:
        options["min_expert_tokens"] = stage.min_expert_tokens
    stage_fingerprint = fingerprint(options, parent_manifest.get("manifest_sha256") if parent_manifest else model)
    check_output_path(out, [model_path])
    if existing_output(out, stage_fingerprint, overwrite):
        return {**checkpoint.read_manifest(out), "skipped": True}

    preflight.check_prune(stage, model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    calibration_texts = None
    if needs_calibration:
        from spp_cli.data.sources import read_texts

        calibration_texts = read_texts(calib)  # a bad source fails before a large model is loaded
    streamed = None
    if prune_streaming.wants_streaming(stage.streaming, model_path):
        try:
            streamed = prune_streaming.open_streamed_model(model_path, dtype, trust_remote_code)
        except prune_streaming.NotStreamable as reason:
            if stage.streaming == "on":
                raise BadInput(f"--streaming on cannot write this model tensor by tensor: {reason}; "
                               "use --streaming auto") from None
    if streamed is not None:
        loaded, tokenizer = streamed.model, prune_streaming.load_tokenizer(model_path, trust_remote_code)
    else:
        loaded, tokenizer = checkpoint.load_model(
            model, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
        )
    options["seqlen"] = checkpoint.resolve_seqlen(loaded.config, stage.seqlen) if needs_calibration else None
    calibration = None
    if needs_calibration:
        from spp_cli.data.sources import calibration_windows

        calibration = calibration_windows(tokenizer, calib, nsamples, options["seqlen"], seed, calibration_texts)
    store = None
    if streamed is not None:
        store = prune_streaming.StreamingStore(streamed, out, prune_streaming.run_fingerprint(
            stage_fingerprint, streamed.source, calibration, compute_device, dtype))
        store.open()
    blocks_seen = []

    def record_block(report) -> None:
        blocks_seen.append(report)
        if on_block is not None:
            on_block(report)

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
            sparsity_profile=stage.sparsity_profile,
            owl_threshold=stage.owl_threshold,
            owl_lambda=stage.owl_lambda,
            refine=stage.refine,
            min_expert_tokens=stage.min_expert_tokens,
            on_block=record_block,
            store=store,
        )
    except (PatternError, PrunerOptionError, UnsupportedModelError) as error:
        if store is not None:
            store.discard()  # bad input: nothing is left behind
        raise BadInput(str(error)) from None
    except BaseException as error:
        if store is not None:
            store.close()  # any other failure keeps the resume directory, and its finished blocks, for the rerun
        if isinstance(error, CholeskyError):
            raise RuntimeFailure(f"SparseGPT failed: {error}; try more calibration windows (--nsamples)") from None
        raise
    if store is not None:  # every block's records, the resumed run's earlier blocks included
        layers, all_reports = store.layers, store.layer_reports()
    else:
        loaded.to(loaded.spp_stored_dtype)
        # MoE experts are slices of fused parameters, not modules: resolve every name with weight_of
        layers, all_reports = {r.name: layer_record(weight_of(loaded, r.name)) for r in reports}, reports
    manifest = stage_manifest(
        "prune",
        parent=checkpoint.parent_record(model_path if Path(model_path).exists() else model, parent_manifest),
        method=method,
        pattern=str(sparsity_pattern),
        target_sparsity=sparsity_pattern.sparsity,
        dense=False,
        layers=layers,
        damping={r.name: r.damping for r in all_reports if r.damping is not None and r.damping > 0.01 + 1e-12},
        **new_option_records(stage, owl_blocks(blocks_seen, store), all_reports),
        config=options,
        fingerprint=stage_fingerprint,
    )
    if store is not None:
        finished = store.finish(manifest, tokenizer, Path(model_path), started)
        return {**finished, "resumed_from_block": store.resumed_from} if store.resumed_from else finished
    return checkpoint.save_checkpoint(
        loaded, tokenizer, out, manifest, parent_dir=model_path if Path(model_path).is_dir() else None, started=started
    )

"""The prune stage: load a model, draw calibration windows, prune block by block, save a checkpoint + spp.json.

`prune` reads as its steps: resolve (the validated options, the fingerprint) -> check (output path, finished
output, model files, calibration source: all before weights load) -> load (model, tokenizer, windows, streaming
store) -> run (pruners.sequential.prune_model) -> record (spp.json) -> publish (the output directory).

Two paths give bit-identical outputs. Streaming (prune_streaming.py: a local directory of safetensors, the default)
holds one block at a time and resumes a killed run at its next block; in memory (hub ids, pickle weights, fused MoE
experts, or `streaming="off"`) loads the whole model first and saves it at the end.
"""

import dataclasses
import time
from pathlib import Path
from typing import Any

from spp_cli import interrupts, preflight
from spp_cli.environment import resolve_device
from spp_cli.errors import BadInput, RuntimeFailure
from spp_cli.events import Listener, notify
from spp_cli.io import checkpoint
from spp_cli.io.disk_full import names_output_on_disk_full
from spp_cli.io.manifest import applied_record, layer_record, stage_manifest
from spp_cli.io.outputs import check_output_path, existing_output, fingerprint
from spp_cli.memory_plan.stages import announce_prune
from spp_cli.recipe.resolve import validate_options
from spp_cli.recipe.schema import PruneStage

CALIBRATION_KEYS = ("calib", "nsamples")


@dataclasses.dataclass
class PrunePlan:
    """What `resolve` decided; the later steps read it."""

    model: str  # as given: hub id, local directory or builtin:NAME
    out: Path
    stage: PruneStage  # the validated options
    pattern: Any  # pruners.masks.SparsityPattern
    device: str  # the resolved compute device
    model_path: str
    parent_manifest: dict | None
    config: dict  # recorded_options: spp.json's "config", seqlen as given (resolved once the model is loaded)
    fingerprint: str
    needs_calibration: bool  # every method but magnitude, and OWL's outlier ratios
    calibration_texts: list | None = None  # read by `check`, so a bad source fails before the model loads


@dataclasses.dataclass
class LoadedModel:
    model: Any  # the HF model (a skeleton without block weights when streamed)
    tokenizer: Any
    calibration: Any  # LongTensor (nsamples, seqlen), or None
    seqlen: int | None  # the resolved window length, None without calibration data
    store: Any  # prune_streaming.StreamingStore, or None in memory
    compute_dtype: Any = None  # torch.dtype the blocks are pruned in
    stored_dtype: Any = None  # torch.dtype the checkpoint is stored (and saved) in


@names_output_on_disk_full
def prune(model: str, out: str | Path, *, overwrite: bool = False, trust_remote_code: bool = False,
          allow_pickle: bool = False, on_event: Listener | None = None, **options) -> dict:
    """Prune `model` one-shot into `out` (an HF directory with exact zeros + spp.json). Returns the manifest.

    `options` are the prune stage's recipe keys (spp_cli/recipe/schema.py, PruneStage): method, sparsity, pattern,
    calib, nsamples, seqlen, seed, ... Skips the work when `out` already holds the same result (same options and
    parent). `on_event` hears a "plan" event first (the memory plan), one "block" event per pruned block (payload:
    pruners.reports.BlockReport; streamed: sent from the writer thread once the block is on disk), and a "note"
    (str) before the first for a resume or OWL's dense pass (`announce`). A streamed run that resumed a killed one
    returns "resumed_from_block": the first block it pruned.
    """
    started = time.time()
    plan = resolve(model, Path(out), options)
    finished = check(plan, overwrite, allow_pickle, trust_remote_code)
    if finished is not None:
        return finished
    computed = compute_dtype(plan.stage.dtype, plan.model_path, plan.device, trust_remote_code)
    announce_prune(on_event, plan.model_path, dataclasses.replace(plan.stage, dtype=computed), plan.device, plan.out,
                   trust_remote_code)  # the plan sizes what is computed: auto on a CPU may be fp32
    loaded = load(plan, computed, trust_remote_code, allow_pickle)
    announce(plan, loaded, on_event)
    reports, blocks_seen = run(plan, loaded, on_event)
    manifest = record(plan, loaded, reports, blocks_seen)
    return publish(plan, loaded, manifest, started)


# ---------------------------------------------------------------------------------------------------------------
# the steps


def resolve(model: str, out: Path, options: dict) -> PrunePlan:
    """The validated options, the pattern and device they name, the parent, the recorded options and fingerprint."""
    stage = validate_options(PruneStage, options)
    pattern = parse_pattern(stage.pattern, stage.sparsity)
    device = resolve_device(stage.device)
    checkpoint.torch_dtype(stage.dtype)
    model_path = checkpoint.resolve_model_path(model)
    parent_manifest = checkpoint.model_manifest(model)
    config = recorded_options(stage, pattern)
    stage_fingerprint = fingerprint(config, parent_manifest.get("manifest_sha256") if parent_manifest else model)
    return PrunePlan(model, out, stage, pattern, device, model_path, parent_manifest, config, stage_fingerprint,
                     needs_calibration(stage))


def check(plan: PrunePlan, overwrite: bool, allow_pickle: bool, trust_remote_code: bool) -> dict | None:
    """What needs no weights: the output path; the finished output's manifest (marked skipped) when it holds this
    very result, else None; the stage's preflight (spp_cli/preflight.py: the model's files, the calibration source,
    seqlen against the model's positions); the calibration texts (read here)."""
    check_output_path(plan.out, [plan.model_path])
    if existing_output(plan.out, plan.fingerprint, overwrite):
        return {**checkpoint.read_manifest(plan.out), "skipped": True}
    preflight.check_prune(plan.stage, plan.model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if plan.needs_calibration:
        from spp_cli.data.sources import read_texts

        plan.calibration_texts = read_texts(plan.stage.calib)
    return None


def load(plan: PrunePlan, dtype: str, trust_remote_code: bool, allow_pickle: bool) -> LoadedModel:
    """The model in `dtype` (compute_dtype's) (streamed: a skeleton whose blocks the store fills one at a time), its
    tokenizer, the calibration windows, and the streaming store (opened: a rerun of a killed prune resumes it)."""
    from spp_cli.stages import prune_streaming

    stage = plan.stage
    streamed = prune_streaming.streamed_model(stage.streaming, plan.model_path, dtype, trust_remote_code)
    if streamed is not None:
        model, stored_dtype = streamed.model, streamed.stored_dtype
        tokenizer = checkpoint.load_tokenizer(plan.model_path, trust_remote_code)
    else:
        model, tokenizer = checkpoint.load_model(plan.model, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 allow_pickle=allow_pickle)
        stored_dtype = model.spp_stored_dtype
    seqlen = calibration = store = None
    if plan.needs_calibration:
        from spp_cli.data.sources import calibration_windows

        seqlen = checkpoint.resolve_seqlen(model.config, stage.seqlen)
        calibration = calibration_windows(tokenizer, stage.calib, stage.nsamples, seqlen, stage.seed,
                                          plan.calibration_texts)
    if streamed is not None:
        store = prune_streaming.StreamingStore(streamed, plan.out, prune_streaming.run_fingerprint(
            plan.fingerprint, streamed.source, calibration, plan.device, dtype))
        store.open()
    return LoadedModel(model, tokenizer, calibration, seqlen, store, next(model.parameters()).dtype, stored_dtype)


def announce(plan: PrunePlan, loaded: LoadedModel, on_event: Listener | None) -> None:
    """"note" events for what comes before the first block's line: the resume of a killed run (which blocks it
    keeps, from where), and OWL's dense pass over every block, which prints nothing while it runs."""
    from pruners.blocks import find_decoder_blocks

    if loaded.store is not None and (note := loaded.store.resume_note()):
        notify(on_event, "prune", "note", note)
    if plan.stage.sparsity_profile == "owl" and (loaded.store is None or loaded.store.saved_owl_profile() is None):
        blocks = len(find_decoder_blocks(loaded.model)[1])
        notify(on_event, "prune", "note", f"OWL: measuring the outlier ratio of all {blocks} blocks in a dense pass "
               "before the first block is pruned")


def run(plan: PrunePlan, loaded: LoadedModel, on_event: Listener | None) -> tuple[list, list]:
    """Prune the loaded model in place (streamed: block by block into the store). Returns the LayerReports and the
    BlockReports of this run. Bad input removes the store's staging directory; any other failure keeps it (and its
    finished blocks) for the rerun."""
    from pruners import CholeskyError
    from pruners.masks import PatternError
    from pruners.sequential import PrunerOptionError, UnsupportedModelError, prune_model

    blocks_seen = []

    def on_block(report) -> None:
        blocks_seen.append(report)
        notify(on_event, "prune", "block", report)

    if loaded.store is not None:  # a streamed block is reported once it is kept on disk
        on_block = loaded.store.when_kept(on_block)
    try:
        reports = prune_model(loaded.model, loaded.calibration, pruner_options(plan), on_block=on_block,
                              store=loaded.store)
    except (PatternError, PrunerOptionError, UnsupportedModelError) as error:
        if loaded.store is not None:
            loaded.store.discard()  # bad input: nothing is left behind
        raise BadInput(str(error)) from None
    except BaseException as error:
        if loaded.store is not None:
            loaded.store.close()
        if isinstance(error, CholeskyError):
            raise RuntimeFailure(f"SparseGPT failed: {error}; try more calibration windows (--nsamples)") from None
        raise
    return reports, blocks_seen


def record(plan: PrunePlan, loaded: LoadedModel, reports: list, blocks_seen: list) -> dict:
    """spp.json (unfinished: checkpoint.finish_manifest adds the timing and its hash): every pruned layer's record,
    SparseGPT's raised dampings, what OWL, DSnoT and MoE fallbacks did, and the recorded options."""
    from pruners.experts import weight_of
    from pruners.sparsegpt import PERCDAMP

    if loaded.store is not None:  # every block's records, the resumed run's earlier blocks included
        layers, all_reports = loaded.store.layers, loaded.store.layer_reports()
    else:
        loaded.model.to(loaded.model.spp_stored_dtype)
        # MoE experts are slices of fused parameters, not modules: resolve every name with weight_of
        layers, all_reports = {r.name: layer_record(weight_of(loaded.model, r.name)) for r in reports}, reports
    model_path = plan.model_path
    return stage_manifest(
        "prune",
        parent=checkpoint.parent_record(model_path if Path(model_path).exists() else plan.model, plan.parent_manifest),
        method=plan.stage.method,
        pattern=str(plan.pattern),
        target_sparsity=plan.pattern.sparsity,
        dense=False,
        layers=layers,
        damping={r.name: r.damping for r in all_reports if r.damping is not None and r.damping > PERCDAMP + 1e-12},
        **new_option_records(plan.stage, owl_blocks(blocks_seen, loaded.store), all_reports),
        config={**plan.config, "seqlen": loaded.seqlen},
        applied=applied_record(device=plan.device, compute_dtype=loaded.compute_dtype,
                               stored_dtype=loaded.stored_dtype, seqlen=loaded.seqlen),
        fingerprint=plan.fingerprint,
    )


def publish(plan: PrunePlan, loaded: LoadedModel, manifest: dict, started: float) -> dict:
    """Write the output atomically (streamed: finish the staging directory the blocks were written into); once it
    is in place the run is done, whatever a Ctrl-C does after (spp_cli/interrupts.py)."""
    model_path = Path(plan.model_path)
    if loaded.store is not None:
        finished = loaded.store.finish(manifest, loaded.tokenizer, model_path, started)
        interrupts.output_published()
        resumed = loaded.store.resumed_from
        return {**finished, "resumed_from_block": resumed} if resumed else finished
    finished = checkpoint.save_checkpoint(loaded.model, loaded.tokenizer, plan.out, manifest,
                                          parent_dir=model_path if model_path.is_dir() else None, started=started)
    interrupts.output_published()
    return finished


# ---------------------------------------------------------------------------------------------------------------
# what the steps use


def compute_dtype(requested: str, model_path: str, device: str, trust_remote_code: bool = False) -> str:
    """The dtype the blocks are pruned in: `requested`, except that "auto" on a CPU computes an fp16 checkpoint in
    float32 (this CPU's fp16 matmuls are several times slower than fp32: benchmarks/prune_dtype.py), and a bf16
    checkpoint in float32 on a CPU without native bf16 instructions (AVX512-BF16 or AMX). Elsewhere "auto" keeps the
    checkpoint's dtype. The output is saved in the checkpoint's dtype either way; spp.json's "applied" records both."""
    if requested not in (None, "auto") or device != "cpu":
        return requested
    stored = checkpoint.config_dtype_name(model_path, trust_remote_code)
    return cpu_auto_dtype(stored, _cpu_has_bf16()) or "auto"


def cpu_auto_dtype(stored: str | None, native_bf16: bool) -> str | None:
    """What "auto" computes a checkpoint stored in `stored` in on a CPU; None: the checkpoint's own dtype.

    fp32 holds every fp16 and bf16 value exactly, so the statistics only gain precision; bf16 stays bf16 where the
    CPU computes it natively (Wanda and SparseGPT were both faster in bf16 than in fp32 there)."""
    if stored == "float16" or (stored == "bfloat16" and not native_bf16):
        return "float32"
    return None


def _cpu_has_bf16() -> bool:
    import torch

    def supported(name: str) -> bool:  # private torch helpers: absent in another version means "not known"
        return bool(getattr(torch.cpu, name, lambda: False)())

    return supported("_is_avx512_bf16_supported") or supported("_is_amx_tile_supported")


def parse_pattern(pattern: str, sparsity: float):
    """The pruners' SparsityPattern for a validated pattern and sparsity."""
    from pruners.masks import PatternError, parse_pattern

    try:
        return parse_pattern(pattern, sparsity)
    except PatternError as error:
        raise BadInput(str(error)) from None


def needs_calibration(stage: PruneStage) -> bool:
    # OWL's outlier ratios and reconstruct's training need data
    return stage.method != "magnitude" or stage.sparsity_profile == "owl" or stage.refine.endswith("reconstruct")


def recorded_options(stage: PruneStage, pattern) -> dict:
    """spp.json's "config" before the model is loaded (seqlen as given): the schema's rule (Stage.NOT_RECORDED),
    with sparsity and pattern as parsed, and calib and nsamples None when no calibration data is read."""
    config = stage.recorded_options() | {"sparsity": pattern.sparsity, "pattern": str(pattern)}
    if not needs_calibration(stage):
        config |= dict.fromkeys(CALIBRATION_KEYS)
    return config


def pruner_options(plan: PrunePlan):
    """The driver's PruneOptions: every option the stage and the driver share, by name."""
    from pruners.options import PruneOptions

    shared = ({f.name for f in dataclasses.fields(PruneOptions)} & {f.name for f in dataclasses.fields(PruneStage)}
              - {"method", "pattern", "device"})
    return PruneOptions(plan.stage.method, plan.pattern, device=plan.device,
                        **{name: getattr(plan.stage, name) for name in shared})


def owl_blocks(blocks_seen: list, store) -> dict[int, tuple[float, float]]:
    """Block index -> (OWL sparsity, outlier ratio) of every pruned block: from the profile a streamed run keeps
    (which covers the blocks a killed run pruned before this one resumed it), else from this run's BlockReports."""
    profile = store.saved_owl_profile() if store is not None else None
    if profile is None:
        return {b.index: (b.sparsity, b.outlier_ratio) for b in blocks_seen}
    return {index: (sparsity, ratio) for index, (sparsity, ratio)
            in enumerate(zip(profile.sparsities, profile.outlier_ratios, strict=True)) if sparsity is not None}


def new_option_records(stage: PruneStage, owl: dict[int, tuple[float, float]], reports: list) -> dict:
    """spp.json entries for OWL (each block's outlier ratio and sparsity), DSnoT, reconstruct (each block's relative
    output error before and after) and MoE fallbacks, when used."""
    records = {}
    if stage.sparsity_profile == "owl":
        records["sparsity_profile"] = {
            "profile": "owl", "threshold": stage.owl_threshold, "lambda": stage.owl_lambda,
            "layer_sparsity": {str(index): round(sparsity, 8) for index, (sparsity, _) in owl.items()},
            "outlier_ratio": {str(index): round(ratio, 8) for index, (_, ratio) in owl.items()},
        }
    if stage.refine != "none":
        records["refine"] = stage.refine
    if stage.refine.endswith("reconstruct"):  # every LayerReport of a block carries the block's pair
        errors = {r.reconstruct["block"]: r.reconstruct for r in reports if r.reconstruct is not None}
        records["reconstruct"] = {"params": stage.reconstruct_params, "block_error": {
            str(block): {key: errors[block][key] for key in ("before", "after")} for block in sorted(errors)}}
    fallbacks = {r.name: {"method": r.fallback, "tokens": r.tokens} for r in reports if r.fallback}
    if fallbacks:
        records["expert_fallbacks"] = fallbacks
        records["warnings"] = [
            f"{len(fallbacks)} expert linear(s) saw fewer than {stage.min_expert_tokens} calibration tokens and were "
            "pruned by magnitude (see expert_fallbacks): use more calibration windows (--nsamples)"
        ]
    return records

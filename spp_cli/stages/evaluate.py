"""The eval stage: evaluate one or more models and write results.json.

results.json has one layout whatever the number of models (docs/results-json.md):
    {"schema_version": 1,
     "models": {name: one model's results object (spp_cli.eval.engine) + "model", "config", "versions", "seconds"},
     "config": {the stage's resolved options}, "notes": [str, each once], "fingerprint": str}
plus "partial": true and "failure": {"model", "path", "error"} while a model that failed is missing.
Models are evaluated one after another so that only one is in memory at a time.
"""

import json
import time
from pathlib import Path

from spp_cli import interrupts, preflight
from spp_cli.environment import resolve_device, versions
from spp_cli.errors import BadInput, first_line
from spp_cli.eval.processes import Processes, launched_processes, start_process_group
from spp_cli.events import Listener, notify
from spp_cli.io import checkpoint
from spp_cli.io.atomic import write_text_atomic
from spp_cli.io.disk_full import names_output_on_disk_full
from spp_cli.io.manifest import applied_record
from spp_cli.io.outputs import check_output_path, existing_output, fingerprint, written_by_spp
from spp_cli.memory_plan.stages import announce_eval
from spp_cli.recipe.resolve import validate_options
from spp_cli.recipe.schema import EvalStage


def model_summary(path: str, manifest: dict | None) -> dict:
    manifest = manifest or {}
    return {
        "path": path,
        "stage": manifest.get("stage", "dense"),
        "method": manifest.get("method"),
        "pattern": manifest.get("pattern"),
        "sparsity": manifest.get("overall_sparsity"),
        "dense": manifest.get("dense", not manifest),
        "manifest_sha256": manifest.get("manifest_sha256"),
    }


RESULTS_SCHEMA_VERSION = 1


def results_entries(results: dict, where: str = "results.json") -> dict:
    """name -> one model's results object of a results.json (the same layout for one model or many)."""
    if not isinstance(results.get("models"), dict):
        raise BadInput(f"{where} has no \"models\" object (a file from an older spp?): rerun spp eval to rewrite it")
    return results["models"]


def check_results_path(out: Path, model_paths: list[str]) -> None:
    """--out is a JSON file: not a directory, not inside a model, not a file that spp did not write."""
    if out.is_dir():
        raise BadInput(f"--out '{out}' is a directory: give a file name such as {out / 'results.json'}")
    check_output_path(out, model_paths)
    if out.exists() and written_by_spp(out) is None:
        raise BadInput(f"--out '{out}' exists and is not an spp results file: choose another --out")


def write_json_atomic(path: Path, content: dict) -> None:
    write_text_atomic(path, json.dumps(content, indent=2, default=str) + "\n")


@names_output_on_disk_full
def evaluate_models(
    models: dict[str, str],
    tasks: list[str] | str,
    out: str | Path,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    overwrite: bool = False,
    on_event: Listener | None = None,
    verbose: bool = False,
    **options,
) -> dict:
    """Evaluate every model (name -> path) on `tasks`; write `out` (results.json) and return
    {"models": {name: results object}, "notes": [...], "out": str}.

    `options` are the other EvalStage keys (spp_cli/recipe/schema.py): seqlen, limit, data_dir, batch_size, device,
    dtype, bos. A results file spp wrote with the same options and models is returned as it is ("skipped"), or
    continued when it is marked "partial"; one with other options is replaced only with `overwrite`, and a file spp
    did not write never. When a model fails (Ctrl-C included), the finished ones are written marked "partial"
    with the failure (docs/results-json.md) before the error goes on. Progress goes to
    `on_event` (spp_cli/events.py) as "progress" events: (k - 1, N, "model k/N NAME") as model k starts, then every
    event of engine.evaluate with its label prefixed "model k/N NAME · ". verbose: let lm-eval print its logging
    and progress bars.
    """
    stage = validate_options(EvalStage, {"models": list(models), "tasks": tasks, **options})
    out = Path(out)
    check_inputs(stage, models, out, allow_pickle, trust_remote_code)
    processes = launched_processes()
    if not processes.is_main:
        on_event = None  # rank 0 reports and writes; the others score their shard quietly
    manifests = {name: checkpoint.model_manifest(path) for name, path in models.items()}
    config = stage.recorded_options()  # results.json's "config" and the fingerprint
    stage_fingerprint = fingerprint(config, json.dumps(parent_identities(models, manifests), sort_keys=True))
    entries = partial_entries(out, stage_fingerprint)
    if not entries and existing_output(out, stage_fingerprint, overwrite):
        return finished_result(out)
    start_process_group(processes, eval_device(stage, processes))
    announce_eval(on_event, {name: path for name, path in models.items() if name not in entries}, stage,
                  resolve_device(stage.device), out, trust_remote_code)
    for number, (name, path) in enumerate(models.items(), start=1):
        label = f"model {number}/{len(models)} {name}"
        if name in entries:
            notify(on_event, "eval", "note", f"{label}: kept from the partial results in {out}")
            continue
        notify(on_event, "eval", "progress", {"done": number - 1, "total": len(models), "label": label})
        try:
            entries[name] = evaluate_one(path, manifests[name], stage, config, _prefixed(on_event, label),
                                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                         verbose=verbose, processes=processes)
        except BaseException as error:  # Ctrl-C included: the finished models' results are kept, marked partial
            if processes.is_main:
                reason = ("interrupted" if isinstance(error, KeyboardInterrupt)
                          else f"{type(error).__name__}: {first_line(error)}")
                keep_partial(out, entries, config, stage_fingerprint, {"model": name, "path": path, "error": reason},
                             on_event)
            raise
    if not processes.is_main:
        return {"rank": processes.rank, "out": str(out)}
    notes = write_results(out, entries, config, stage_fingerprint)
    interrupts.output_published()  # results.json is whole: the run is done (spp_cli/interrupts.py)
    return {"models": entries, "notes": notes, "out": str(out)}


def write_results(out: Path, entries: dict, config: dict, stage_fingerprint: str, failure: dict | None = None
                  ) -> list[str]:
    """Write results.json (with `failure`: the finished models only, marked "partial"); returns its notes."""
    notes = list(dict.fromkeys(note for entry in entries.values() for note in entry.get("notes", [])))
    partial = {"partial": True, "failure": failure} if failure is not None else {}
    write_json_atomic(out, {"schema_version": RESULTS_SCHEMA_VERSION, "models": entries, "config": config,
                            "notes": notes, **partial, "fingerprint": stage_fingerprint})
    return notes


def keep_partial(out: Path, entries: dict, config: dict, stage_fingerprint: str, failure: dict,
                 on_event: Listener | None) -> None:
    """A later model failed: keep the finished ones in `out`, marked partial, for a rerun to continue from."""
    if not entries:
        return
    write_results(out, entries, config, stage_fingerprint, failure)
    notify(on_event, "eval", "note", f"the results of {', '.join(entries)} are kept in {out}, marked partial (model "
           f"{failure['model']} did not finish): rerun the same command to evaluate the rest")


def partial_entries(out: Path, stage_fingerprint: str) -> dict:
    """The finished models of an earlier run with the same options that stopped part-way (a "partial" file)."""
    stored = written_by_spp(out) if out.is_file() else None
    if not stored or not stored.get("partial") or stored.get("fingerprint") != stage_fingerprint:
        return {}
    return dict(results_entries(stored, str(out)))


def check_inputs(stage: EvalStage, models: dict[str, str], out: Path, allow_pickle: bool,
                 trust_remote_code: bool) -> None:
    """Every check before the first model loads: the stage's preflight, then where the results go."""
    preflight.check_eval(stage, models, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    check_results_path(out, [checkpoint.resolve_model_path(path) for path in models.values()])


def parent_identities(models: dict[str, str], manifests: dict[str, dict | None]) -> dict[str, str]:
    """A model is identified by its manifest hash, else by its reference (a hub id or a plain directory)."""
    return {name: (manifests[name] or {}).get("manifest_sha256") or path for name, path in models.items()}


def finished_result(out: Path) -> dict:
    stored = json.loads(out.read_text(encoding="utf-8"))
    return {"models": results_entries(stored, str(out)), "notes": stored.get("notes", []), "out": str(out),
            "skipped": True}


def eval_device(stage: EvalStage, processes: Processes) -> str:
    """The device a model is evaluated on (with a device map: where the map starts), this process's own GPU when
    several processes were launched."""
    return processes.device(resolve_device(stage.device))


def evaluate_one(path: str, manifest: dict | None, stage: EvalStage, config: dict, on_progress, *,
                 trust_remote_code: bool, allow_pickle: bool, verbose: bool, processes: Processes) -> dict:
    """One model's results object: load it on the stage's device (or spread by its device map), run every task,
    free it."""
    from spp_cli.eval.engine import evaluate
    from spp_cli.eval.placement import placed_model

    started = time.time()
    device = eval_device(stage, processes)
    with placed_model(path, device_map=stage.device_map, max_memory=stage.max_memory,
                      offload_folder=stage.offload_folder, device=device, dtype=stage.dtype,
                      trust_remote_code=trust_remote_code, allow_pickle=allow_pickle) as (model, tokenizer, placement):
        result = evaluate(model, tokenizer, stage.tasks, seqlen=stage.seqlen, limit=stage.limit,
                          data_dir=stage.data_dir, batch_size=stage.batch_size, device=None, bos=stage.bos,
                          on_progress=on_progress, verbose=verbose, processes=processes)
        compute_dtype, stored_dtype = next(model.parameters()).dtype, model.spp_stored_dtype
        del model
    # "applied": what was resolved for this model (config holds what was asked); seqlen is the perplexity window;
    # the placement and the number of processes only when they are not the default
    spread = ({"placement": placement} if placement else {}) | (
        {"processes": processes.world_size} if processes.world_size > 1 else {})
    applied = applied_record(device=device, compute_dtype=compute_dtype, stored_dtype=stored_dtype,
                             seqlen=next((entry["seqlen"] for entry in result["perplexity"].values()), None),
                             **spread)
    return result | {"model": model_summary(path, manifest), "config": config, "applied": applied,
                     "versions": versions(), "seconds": round(time.time() - started, 2)}


def _prefixed(on_event: Listener | None, prefix: str):
    """engine.evaluate's on_progress(done, total, label) as "progress" events with the label prefixed."""
    if on_event is None:
        return None
    return lambda done, total, label: notify(on_event, "eval", "progress",
                                             {"done": done, "total": total, "label": f"{prefix} · {label}"})

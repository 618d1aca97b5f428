"""The eval stage: evaluate one or more models and write results.json.

results.json has one layout whatever the number of models (docs/results-json.md):
    {"schema_version": 1,
     "models": {name: one model's results object (spp_cli.eval.engine) + "model", "config", "versions", "seconds"},
     "config": {the stage's resolved options}, "notes": [str, each once], "fingerprint": str}
Models are evaluated one after another so that only one is in memory at a time.
"""

import json
import time
from pathlib import Path

from spp_cli import checkpoint
from spp_cli.atomic import write_text_atomic
from spp_cli.environment import resolve_device, versions
from spp_cli.errors import BadInput
from spp_cli.outputs import check_output_path, existing_output, fingerprint, written_by_spp


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


def evaluate_models(
    models: dict[str, str],
    tasks: list[str],
    out: str | Path,
    *,
    seqlen: int | None = None,
    limit: int | None = None,
    data_dir: str | None = None,
    batch_size: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    bos: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    skip_if_done: bool = False,
    overwrite: bool = True,
    on_progress=None,
    verbose: bool = False,
) -> dict:
    """Evaluate every model (name -> path) on `tasks`; write `out` (results.json) and return
    {"models": {name: results object}, "notes": [...], "out": str}.

    bos: the zero-shot BOS rule, auto | yes | no (spp_cli.eval.zeroshot). on_progress(done, total, label):
    called with (k - 1, N, "model k/N NAME") as model k starts, then with every event of engine.evaluate,
    its label prefixed "model k/N NAME · " (e.g. "model 2/3 prune · wikitext2 windows"), and (N, N, "models")
    at the end. verbose: let lm-eval print its logging and progress bars.
    """
    from spp_cli.eval.engine import evaluate, validate_tasks
    from spp_cli.eval.zeroshot import check_bos_rule

    if not tasks:
        raise BadInput("no tasks given: use --tasks wikitext2,boolq,... (or ppl:SOURCE)")
    if batch_size < 1:
        raise BadInput(f"batch size {batch_size} is invalid: use at least 1")
    if limit is not None and limit < 1:
        raise BadInput(f"limit {limit} is invalid: use at least 1 example per task")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise BadInput(f"--data-dir '{data_dir}' is not a directory: point it at a folder laid out like shared/data")
    check_bos_rule(bos)
    validate_tasks(tasks, data_dir=data_dir)
    out = Path(out)
    check_results_path(out, [checkpoint.resolve_model_path(path) for path in models.values()])
    config = {
        "tasks": tasks,
        "seqlen": seqlen,
        "limit": limit,
        "data_dir": data_dir,
        "batch_size": batch_size,
        "dtype": dtype,
        "bos": bos,
    }
    manifests = {name: checkpoint.model_manifest(path) for name, path in models.items()}
    # a model is identified by its manifest hash, else by its name (a hub id or a plain directory)
    parents = {name: (manifests[name] or {}).get("manifest_sha256") or path for name, path in models.items()}
    stage_fingerprint = fingerprint(config, json.dumps(parents, sort_keys=True))
    if skip_if_done and out.is_file():
        stored = json.loads(out.read_text(encoding="utf-8"))
        if existing_output(out, stage_fingerprint, overwrite):
            return {
                "models": results_entries(stored, str(out)),
                "notes": stored.get("notes", []),
                "out": str(out),
                "skipped": True,
            }
    compute_device = resolve_device(device)
    entries, notes = {}, []
    for number, (name, path) in enumerate(models.items(), start=1):
        started = time.time()
        model_label = f"model {number}/{len(models)} {name}"
        if on_progress is not None:
            on_progress(number - 1, len(models), model_label)
        model, tokenizer = checkpoint.load_model(
            path, dtype=dtype, device=compute_device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
        )
        result = evaluate(
            model,
            tokenizer,
            tasks,
            seqlen=seqlen,
            limit=limit,
            data_dir=data_dir,
            batch_size=batch_size,
            device=compute_device,
            bos=bos,
            on_progress=_prefixed(on_progress, model_label),
            verbose=verbose,
        )
        result["model"] = model_summary(path, manifests[name])
        result["config"] = config
        result["versions"] = versions()
        result["seconds"] = round(time.time() - started, 2)
        entries[name] = result
        notes += [note for note in result.get("notes", []) if note not in notes]
        del model
    if on_progress is not None:
        on_progress(len(models), len(models), "models")
    content = {"schema_version": RESULTS_SCHEMA_VERSION, "models": entries, "config": config, "notes": notes,
               "fingerprint": stage_fingerprint}
    write_json_atomic(out, content)
    return {"models": entries, "notes": notes, "out": str(out)}


def _prefixed(on_progress, prefix: str):
    """on_progress with every label prefixed (None stays None)."""
    if on_progress is None:
        return None
    return lambda done, total, label: on_progress(done, total, f"{prefix} · {label}")

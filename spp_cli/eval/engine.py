"""`spp eval` for one in-memory model: paper-protocol token perplexity plus lm-eval zero-shot tasks.

Task names (DESIGN.md): `wikitext2` and `c4` are the papers' token perplexity (eval/perplexity.py),
`ppl:SOURCE` token perplexity on any spp data source, and every other name is an lm-eval task run through its
Python API (eval/zeroshot.py). With `data_dir`, wikitext2 and the eight tasks of zeroshot.BUNDLE_TASKS read
local files laid out like shared/data, so an air-gapped machine evaluates without the Hub.

The result is one model's object of results.json (layout: docs/results-json.md):
    {"results": {task: {"alias", "acc,none", "acc_stderr,none", "acc_norm,none", ...}},   # lm-eval's layout
     "perplexity": {task: {"value", "protocol", "seqlen", "windows", "tokens", "stream_tokens", "source"}},
     "mean_acc_7": float | None, "n-samples": {task: {"original", "effective"}},
     "task_versions": {task: version},
     "sources": {task: {"task_file", "data", "prompt"}},        # zero-shot: which task file, data and prompt
     "bos": {"rule", "lm_eval_add_bos_token", "prepends_bos"} | None,   # zero-shot BOS rule (zeroshot.py)
     "notes": [str]}
The eval stage (spp_cli/stages/evaluate.py) adds "model", "config", "versions" and "seconds" and writes
results.json as {"models": {name: this object}, "config", "notes", "fingerprint"}, one model or many.

Progress: `on_progress(done, total, label)` is called as work advances: perplexity windows ("wikitext2
windows", done of total windows) and zero-shot tasks ("zero-shot boolq", done of total tasks). Library code
never prints; the CLI draws it.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from spp_cli.environment import is_offline, resolve_device
from spp_cli.errors import BadInput
from spp_cli.eval.perplexity import check_available, perplexity_stream, token_perplexity
from spp_cli.eval.processes import Processes
from spp_cli.eval.zeroshot import (
    BUNDLE_TASKS,
    check_reachable_offline,
    lm_eval_task_names,
    mean_acc_7,
    render_bundle_task,
    run_zeroshot,
)
from spp_cli.io.checkpoint import resolve_seqlen

PERPLEXITY_TASKS = ("wikitext2", "c4")


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    *,
    seqlen: int | None = None,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 1,
    device=None,
    bos: str = "auto",
    on_progress=None,
    verbose: bool = False,
    processes: Processes | None = None,
) -> dict:
    """Evaluate `model` on `tasks`; returns one results object (module docstring).

    seqlen: perplexity window, default min(2048, max_position_embeddings); printed with every number.
    limit: first N examples per zero-shot task and first N windows per perplexity task (quick runs; a note
        says the numbers are not the full protocol).
    batch_size: windows (perplexity) or requests (lm-eval) per forward pass.
    device: None keeps the model where it is; "auto", "cpu", "cuda[:i]" move it there (in place).
    bos: zero-shot BOS rule, auto | yes | no (eval/zeroshot.py); perplexity always has one BOS at the start of
        its stream, as the papers' code does.
    on_progress: callable(done, total, label), see the module docstring. verbose: let lm-eval print.
    processes: this process's place when several were launched (eval/processes.py): each scores a shard and every
        one returns the gathered perplexity; the zero-shot results are complete on rank 0 only.
    All task names and local files are checked before any model work (BadInput); the option values themselves are
    the eval stage's to check (its schema, spp_cli/recipe/schema.py EvalStage).
    """
    perplexity_tasks, zeroshot_tasks = validate_tasks(tasks, data_dir=data_dir)
    seqlen = resolve_seqlen(model.config, seqlen)
    if device is not None:
        model.to(resolve_device(device))

    result = {"results": {}, "perplexity": {}, "mean_acc_7": None, "n-samples": {}, "task_versions": {},
              "sources": {}, "bos": None, "notes": []}
    for task in perplexity_tasks:
        stream, source = perplexity_stream(task, tokenizer, seqlen, data_dir)
        result["perplexity"][task] = token_perplexity(
            model, stream, seqlen, batch_size, max_windows=limit, on_progress=on_progress, label=f"{task} windows",
            processes=processes,
        )
        result["perplexity"][task]["source"] = source
        if limit is not None:
            result["perplexity"][task]["limit"] = limit
    if zeroshot_tasks:
        zeroshot = run_zeroshot(model, tokenizer, zeroshot_tasks, data_dir=data_dir, limit=limit,
                                batch_size=batch_size, bos=bos, on_progress=on_progress, verbose=verbose,
                                processes=processes)
        for key in ("results", "n-samples", "task_versions", "sources"):
            result[key] |= zeroshot[key]
        result["bos"] = zeroshot["bos"]
        result["notes"] += zeroshot["notes"]
        result["mean_acc_7"] = mean_acc_7(result["results"])
    if limit is not None:
        result["notes"].append(
            f"limit {limit}: only the first {limit} examples (zero-shot) or windows (perplexity) per task were "
            "scored; not comparable with full-protocol numbers"
        )
    return result


def validate_tasks(tasks: list[str], *, data_dir: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """Check task names and local files without a model: returns (perplexity tasks, zero-shot tasks).

    BadInput for an unknown name (close names suggested), a missing data file under `data_dir`, or a Hub-only
    perplexity task while offline without `data_dir`. Callers run it before loading any model.
    """
    perplexity_tasks, zeroshot_tasks = resolve_tasks(tasks)
    check_data(perplexity_tasks, zeroshot_tasks, data_dir)
    return perplexity_tasks, zeroshot_tasks


def resolve_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """Split task names into (perplexity, zero-shot), in order, duplicates dropped.

    Raises BadInput for an empty list or an unknown name, suggesting close names (spp's and lm-eval's).
    """
    names = [name.strip() for name in tasks if name.strip()]
    if not names:
        raise BadInput("no tasks given: pass e.g. --tasks wikitext2,boolq")
    perplexity, zeroshot = [], []
    for task in dict.fromkeys(names):
        if task in PERPLEXITY_TASKS or task.startswith("ppl:"):
            if task == "ppl:":
                raise BadInput("task ppl: needs a source: use ppl:SOURCE, e.g. ppl:builtin:python-docs:test")
            perplexity.append(task)
        elif task in BUNDLE_TASKS or task in lm_eval_task_names():
            zeroshot.append(task)
        else:
            raise BadInput(_unknown_task_message(task))
    return perplexity, zeroshot


def _unknown_task_message(task: str) -> str:
    spp_names = [*PERPLEXITY_TASKS, "ppl:SOURCE", *BUNDLE_TASKS]
    # lm-eval lists a name once per task, group and tag that has it: deduplicate, keeping the order
    candidates = list(dict.fromkeys([*spp_names, *lm_eval_task_names()]))
    close = difflib.get_close_matches(task, candidates, n=3, cutoff=0.6)
    if close:
        names = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
        return f"unknown task '{task}': did you mean {names}?"
    return (
        f"unknown task '{task}': use wikitext2, c4, ppl:SOURCE or an lm-eval task name such as "
        f"{', '.join(BUNDLE_TASKS)}"
    )


def check_data(perplexity_tasks: list[str], zeroshot_tasks: list[str], data_dir) -> None:
    """Fail fast (BadInput) on local files that are missing, before any model work."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise BadInput(f"--data-dir {data_dir} is not a directory: point it at a directory laid out like shared/data")
    for task in zeroshot_tasks:
        if data_dir is not None and task in BUNDLE_TASKS:
            render_bundle_task(task, data_dir)
    for task in perplexity_tasks:
        check_available(task, data_dir)
    if data_dir is None and is_offline():
        check_reachable_offline(zeroshot_tasks)


"""Pinned results a recipe expects (its top-level `expect:` key), checked by `spp run` after the last stage.

    expect:
      finetune:                            # a model an eval stage evaluates, or a prune/finetune stage
        ppl:builtin:python-docs:test: {value: 85.1483, rel_tol: 0.02}   # a task of an eval stage of that model
        sparsity: {value: 0.6961, rel_tol: 0.001}                       # the stage's overall_sparsity (spp.json)
        boolq/acc: {value: 0.62, rel_tol: 0.05}                         # TASK/METRIC: an lm-eval metric

A metric is a perplexity task (its value), an lm-eval task (its acc), TASK/METRIC (METRIC as results.json names
it; ",none" may be left off), `mean_acc_7`, or `sparsity`. It is within tolerance when
|observed - value| <= rel_tol * |value| (relative to the pinned value). Pure Python: no torch.
"""

from __future__ import annotations

import math
from typing import Any

from spp_cli.errors import BadInput

EXPECT_TEXT = ("a mapping: model or stage name -> metric (sparsity, a task, TASK/METRIC or mean_acc_7) -> "
               "{value: number, rel_tol: number >= 0}")

Expectations = dict[str, dict[str, dict[str, float]]]  # name -> metric -> {"value", "rel_tol"}


def parse_expectations(raw: Any, fail) -> Expectations:
    """The recipe's `expect:` value checked and normalised (floats); `fail(message)` raises naming the key."""
    if not isinstance(raw, dict) or not raw:
        fail(f"is not {EXPECT_TEXT}")
    parsed: Expectations = {}
    for name, metrics in raw.items():
        if not isinstance(name, str) or not isinstance(metrics, dict) or not metrics:
            fail(f"{name!r} must map metric names to {{value, rel_tol}}, e.g. sparsity: {{value: 0.5, rel_tol: 0.001}}")
        parsed[name] = {}
        for metric, pin in metrics.items():
            where = f"{name}.{metric}"
            if not isinstance(pin, dict) or set(pin) != {"value", "rel_tol"}:
                fail(f"{where}: {pin!r} must be {{value: number, rel_tol: number >= 0}}, both keys and no other")
            numbers = {}
            for key in ("value", "rel_tol"):
                number = pin[key]
                if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                    fail(f"{where}.{key}: {number!r} is not a finite number")
                numbers[key] = float(number)
            if numbers["rel_tol"] < 0:
                fail(f"{where}.rel_tol: {pin['rel_tol']!r} is negative; use a number >= 0")
            parsed[name][str(metric)] = numbers
    return parsed


def _task_of(metric: str) -> str:
    return metric.split("/", 1)[0]


def _same_task(metric: str, task: str) -> bool:
    """`metric` (or TASK/METRIC's TASK) is `task`, or the same ppl source by its short name (ppl:./x.jsonl)."""
    from spp_cli.render import short_task_name

    wanted = _task_of(metric) if not metric.startswith("ppl:") else metric
    return wanted == task or (wanted.startswith("ppl:") and short_task_name(wanted) == short_task_name(task))


def check_measured(expect: Expectations | None, recipe) -> None:
    """Before any stage runs: every pinned metric is one the recipe measures (spp_cli/pipeline.py check_recipe)."""
    model_stages = [s.name for s in recipe.stages if s.TYPE in ("prune", "finetune")]
    evals = [s for s in recipe.stages if s.TYPE == "eval"]
    for name, metrics in (expect or {}).items():
        evaluations = [s for s in evals if name in s.reads()]
        if name not in model_stages and not evaluations:
            known = ", ".join(dict.fromkeys([*model_stages, *(m for s in evals for m in s.reads())]))
            raise BadInput(f"recipe key expect.{name}: no stage writes or evaluates {name!r} (known: {known}); "
                           "name a prune/finetune stage or a model an eval stage lists")
        for metric in metrics:
            if metric == "sparsity" and (name in model_stages or evaluations):
                continue
            if metric == "mean_acc_7" and evaluations:
                continue
            if any(_same_task(metric, task) for s in evaluations for task in s.tasks):
                continue
            tasks = ", ".join(dict.fromkeys(t for s in evaluations for t in s.tasks)) or "none"
            raise BadInput(f"recipe key expect.{name}.{metric}: no eval stage measures it for {name!r} "
                           f"(tasks: {tasks}); use sparsity, mean_acc_7, one of the tasks or TASK/METRIC")


def observed_value(name: str, metric: str, manifests: dict, evaluations: dict) -> float | None:
    """What the run measured: spp.json's overall_sparsity of a stage, else the evaluation's number; None if none."""
    if metric == "sparsity" and isinstance((manifests.get(name) or {}).get("overall_sparsity"), float):
        return manifests[name]["overall_sparsity"]
    entry = evaluations.get(name) or {}
    if metric == "sparsity":
        return (entry.get("model") or {}).get("sparsity")
    if metric == "mean_acc_7":
        return entry.get("mean_acc_7")
    for task, record in (entry.get("perplexity") or {}).items():
        if _same_task(metric, task):
            return record.get("value")
    task, _, key = metric.partition("/")
    results = (entry.get("results") or {}).get(task) or {}
    key = key or "acc"
    value = results.get(key, results.get(f"{key},none"))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def check_expectations(expect: Expectations, manifests: dict, evaluations: dict) -> dict:
    """Each pin against what the run measured: {"checked", "within", "ok", "results": [{name, metric, value,
    rel_tol, observed (None: not measured), relative_difference, ok}]} in the recipe's order."""
    results = []
    for name, metrics in expect.items():
        for metric, pin in metrics.items():
            observed, value = observed_value(name, metric, manifests, evaluations), pin["value"]
            difference = None if observed is None or value == 0 else (observed - value) / abs(value)
            ok = observed is not None and abs(observed - value) <= pin["rel_tol"] * abs(value)
            results.append({"name": name, "metric": metric, "value": pin["value"], "rel_tol": pin["rel_tol"],
                            "observed": observed, "relative_difference": difference, "ok": ok})
    within = sum(result["ok"] for result in results)
    return {"checked": len(results), "within": within, "ok": within == len(results), "results": results}


def describe(result: dict) -> str:
    """One check in words: `finetune ppl:builtin:python-docs:test 90.1234, pinned 85.1483 ± 2% (+5.84%)`."""
    pinned = f"pinned {result['value']:.6g} ± {100 * result['rel_tol']:.3g}%"
    if result["observed"] is None:
        return f"{result['name']} {result['metric']}: not measured by this run, {pinned}"
    difference = result["relative_difference"]
    off = f" ({100 * difference:+.3g}%)" if difference is not None else ""
    return f"{result['name']} {result['metric']} {result['observed']:.6g}, {pinned}{off}"


def verdict(expectations: dict) -> list[str]:
    """The lines `spp run` prints: each miss, then `expectations: 3/3 within tolerance`."""
    misses = [f"expectation missed: {describe(result)}" for result in expectations["results"] if not result["ok"]]
    return [*misses, f"expectations: {expectations['within']}/{expectations['checked']} within tolerance"]

"""`spp report`'s pick from a recipe's sweeps (spp_cli/recipe/sweep.py; run.json's "sweeps"): for each sweep, the
values of its keys other than `seed` (e.g. the lr) with the lowest final held-out loss, averaged over the seeds
(spp.json's training.eval_loss), and that pick's test figures (the eval stage's ppl and accuracies) as
mean ± spread over the seeds, where spread is half the range: with two seeds, the two values are mean ± spread.
The test split never takes part in the choice.
"""

from __future__ import annotations

from spp_cli.recipe.sweep import REPLICATE_KEY


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """(mean, half the range) of `values`."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def pick(members: list[dict], manifests: dict, evaluations: dict) -> dict:
    """One sweep's choice. `members`: run.json's [{"stage", "values"}]. Returns {"candidates": [{"values",
    "stages", "held_out_losses", "mean_held_out_loss"}], "chosen": the candidate with the lowest mean (None when no
    candidate has a held-out loss for every seed), "test": metric title -> {"mean", "spread", "values"}}."""
    candidates: dict[tuple, dict] = {}
    for member in members:
        choice = {key: value for key, value in member["values"].items() if key != REPLICATE_KEY}
        entry = candidates.setdefault(tuple(sorted(choice.items())), {"values": choice, "stages": [],
                                                                        "held_out_losses": []})
        entry["stages"].append(member["stage"])
        loss = ((manifests.get(member["stage"]) or {}).get("training") or {}).get("eval_loss")
        entry["held_out_losses"].append(loss)
    for entry in candidates.values():
        losses = entry["held_out_losses"]
        entry["mean_held_out_loss"] = None if None in losses else mean_and_spread(losses)[0]
    scored = [c for c in candidates.values() if c["mean_held_out_loss"] is not None]
    chosen = min(scored, key=lambda c: c["mean_held_out_loss"]) if scored else None
    return {"candidates": list(candidates.values()), "chosen": chosen,
            "test": test_figures(chosen["stages"], evaluations) if chosen else {}}


def test_figures(stages: list[str], evaluations: dict) -> dict[str, dict]:
    """Every metric the evaluations of `stages` all have: {"mean", "spread", "values"} over those stages."""
    from spp_cli.render import metric_columns, metric_number

    entries = {name: evaluations[name] for name in stages if name in evaluations}
    if len(entries) < len(stages):
        return {}
    figures = {}
    for title, section, key in metric_columns(entries):
        values = [metric_number(entry, section, key) for entry in entries.values()]
        if all(isinstance(value, (int, float)) for value in values):
            mean, spread = mean_and_spread(values)
            figures[title] = {"mean": mean, "spread": spread, "values": values}
    return figures


def sweeps_section(sweeps: dict[str, list[dict]], manifests: dict, evaluations: dict) -> tuple[str, dict]:
    """(report.md's section, sweep name -> pick) for run.json's sweeps."""
    picks = {name: pick(members, manifests, evaluations) for name, members in sweeps.items()}
    lines = ["## Sweeps: the pick on the held-out split\n",
             "For each sweep, the values (all but the seed) with the lowest final held-out loss, mean over the "
             "seeds; then that pick's test figures as mean ± half the range over the seeds.\n",
             "| sweep | values | stages | held-out loss per seed | mean | picked |", "|---|---|---|---|---|---|"]
    for name, chosen in picks.items():
        for candidate in chosen["candidates"]:
            losses = ", ".join("-" if loss is None else f"{loss:.4f}" for loss in candidate["held_out_losses"])
            mean = candidate["mean_held_out_loss"]
            lines.append(f"| {name} | {_values_text(candidate['values'])} | {', '.join(candidate['stages'])} | "
                         f"{losses} | {'-' if mean is None else f'{mean:.4f}'} | "
                         f"{'yes' if candidate is chosen['chosen'] else ''} |")
    titles = list(dict.fromkeys(title for chosen in picks.values() for title in chosen["test"]))
    if titles:
        lines += ["", "| sweep | picked | seeds | " + " | ".join(titles) + " |", "|---|---|---|" + "---|" * len(titles)]
        for name, chosen in picks.items():
            if chosen["chosen"] is None:
                continue
            cells = [(f"{f['mean']:.4f} ± {f['spread']:.4f}" if (f := chosen["test"].get(title)) else "-")
                     for title in titles]
            lines.append(f"| {name} | {_values_text(chosen['chosen']['values'])} | "
                         f"{len(chosen['chosen']['stages'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", picks


def _values_text(values: dict) -> str:
    return ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in values.items()) or "(seeds only)"

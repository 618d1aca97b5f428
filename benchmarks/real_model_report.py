"""What benchmarks/real_model.py makes of a finished report: the issue's targets and the README's tables."""

from __future__ import annotations

from benchmarks.prune import PEER_METHODS

PATTERNS = ("unstructured", "2:4")  # both at 50%
METHODS = ("magnitude", "wanda", "sparsegpt")


def targets(report: dict) -> dict:
    """The issue's targets, measured (never tuned to)."""
    ppl = {(row.get("method", "dense"), row.get("pattern"), row["tool"]): row["eval"]["wikitext2_ppl"]
           for row in report["rows"]}
    found = {}
    for pattern in PATTERNS:
        for method in PEER_METHODS:
            ours, theirs = ppl.get((method, pattern, "spp")), ppl.get((method, pattern, "llmcompressor"))
            if ours and theirs:
                found[f"{method} {pattern}: spp ppl within 0.5% of llm-compressor's"] = {
                    "relative_difference": round(ours / theirs - 1, 5), "met": abs(ours / theirs - 1) <= 0.005}
            magnitude = ppl.get(("magnitude", pattern, "spp"))
            if ours and magnitude:
                found[f"{method} {pattern}: better than magnitude"] = {"ppl": ours, "magnitude": magnitude,
                                                                       "met": ours < magnitude}
    recovery = report.get("recovery")
    if recovery and "spp" in recovery:
        found["SPP lowers the Wanda 2:4 ppl"] = {"met": recovery["spp"]["gap_recovered"] > 0,
                                                 "gap_recovered": recovery["spp"]["gap_recovered"]}
        found["SPP keeps every zero (spp verify)"] = {"met": recovery["spp"]["verify"]["ok"]
                                                      and recovery["spp"]["verify"]["lost_zeros"] == 0}
    return found


def markdown_table(report: dict) -> str:
    """The README table of a report: one line per (method, pattern), spp and llm-compressor side by side."""
    def cell(row, key):
        if row is None:
            return ""
        value = row["eval"][key]
        return "–" if value is None else f"{value:.2f}" if key == "wikitext2_ppl" else f"{value:.3f}"

    def seconds(row):
        return "" if row is None else f"{row['prune']['process_seconds']:.0f}"

    by_key = {(row.get("method"), row.get("pattern"), row["tool"]): row for row in report["rows"]}
    dense = by_key[(None, None, None)]
    lines = ["| model | ppl spp | ppl llm-compressor | mean acc spp | mean acc llm-compressor | "
             "prune s spp | prune s llm-compressor |", "|---|---|---|---|---|---|---|",
             f"| dense | {cell(dense, 'wikitext2_ppl')} | | {cell(dense, 'mean_acc_8')} | | | |"]
    for pattern in PATTERNS:
        for method in METHODS:
            ours, theirs = by_key.get((method, pattern, "spp")), by_key.get((method, pattern, "llmcompressor"))
            lines.append(f"| {method} {pattern} | {cell(ours, 'wikitext2_ppl')} | {cell(theirs, 'wikitext2_ppl')} | "
                         f"{cell(ours, 'mean_acc_8')} | {cell(theirs, 'mean_acc_8')} | {seconds(ours)} | "
                         f"{seconds(theirs) or 'n/a'} |")
    recovery = report.get("recovery")
    return "\n".join(lines) + ("\n\n" + recovery_table(report) if recovery else "")


def recovery_table(report: dict) -> str:
    """One line per recovery method of spp's Wanda 2:4 model, as `spp report`'s recovery table."""
    lines = [f"| Wanda 2:4 + method ({report['sizes']['steps']} steps) | lr | trainable params | zeros kept "
             "(spp verify) | s/step | memory MB | wikitext2 ppl | % of gap recovered | mean acc |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, result in report["recovery"].items():
        verify = result["verify"]
        zeros = "no (dense after merge)" if verify["dense"] else (
            f"yes ({verify['lost_zeros']} lost)" if verify["ok"] else f"NO ({verify['lost_zeros']} lost)")
        acc = result["eval"]["mean_acc_8"]
        step, memory = result.get("seconds_per_step"), result.get("peak_memory_mb")
        lines.append(f"| {method} | {result['lr']:g} | {result['trainable_params']:,} | {zeros} | "
                     f"{'-' if step is None else f'{step:.2f}'} | {'-' if memory is None else f'{memory:.0f}'} | "
                     f"{result['eval']['wikitext2_ppl']:.2f} | {100 * result['gap_recovered']:.1f} | "
                     f"{'–' if acc is None else f'{acc:.3f}'} |")
    return "\n".join(lines)

"""`spp bench`'s console tables (rich): what each step costs per block and for the whole model. Part of the
console side, with render.py (split from it along the one command that has its own tables)."""

from rich.table import Table


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.3g}"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def bench_prune_table(rows: list[dict], model: dict) -> Table:
    table = Table(title=f"prune (calibration {model['calibration']})")
    for title in ("method", "pattern", "s / block", "s measured", f"s whole model ({model['real_depth']} blocks)",
                  "peak memory GiB"):
        table.add_column(title, justify="left" if title in ("method", "pattern") else "right")
    for row in rows:
        if "error" in row:
            table.add_row(row["method"], row["pattern"], f"failed: {row['error']}", "", "", "")
            continue
        table.add_row(row["method"], row["pattern"], _seconds(row["seconds_per_block"]),
                      _seconds(row["seconds_measured"]), _seconds(row["seconds_whole_model"]),
                      _gib(row["peak_memory_bytes"]))
    return table


def bench_recovery_table(recovery: dict, model: dict) -> Table:
    table = Table(title=f"recovery step, batch {'x'.join(map(str, recovery['batch']))}, {recovery['precision']}; "
                        f"whole model = {model['real_depth']} blocks")
    for title in ("method", "s / step whole model", "x LoRA", "peak memory GiB whole model", "x LoRA",
                  "trainable params", "merge s whole model", "zeros kept after merge"):
        table.add_column(title, justify="left" if title == "method" else "right")
    for row in recovery["methods"]:
        if "error" in row:
            table.add_row(row["method"], f"failed: {row['error']}", *[""] * 6)
            continue
        kept = row["zeros_kept_after_merge"]
        table.add_row(row["method"], _seconds(row["step_seconds_whole_model"]), _ratio(row.get("step_ratio_vs_lora")),
                      _gib(row["peak_memory_bytes_whole_model"]), _ratio(row.get("memory_ratio_vs_lora")),
                      f"{row['trainable_params']:,}", _seconds(row["merge_seconds_whole_model"]),
                      "n/a (dense merge)" if kept is None else ("yes" if kept else "NO"))
    return table


def render_bench(console, result: dict) -> None:
    """`spp bench`'s tables: what each step costs per block and for the whole model, and how memory was read."""
    model, device, options = result["model"], result["device"], result["options"]
    what = f"shape {model['shape']}" if model.get("shape") else model["source"]
    console.print(f"spp bench: {what} ({model['architecture']}, hidden {model['hidden_size']}, "
                  f"{model['blocks_built']} of {model['real_depth']} blocks built, {model['dtype']}) on "
                  f"{device['type']} ({device['name']})")
    model = {**model, "calibration": f"{options['nsamples']} x {options['seqlen']} tokens"}
    if "prune" in result:
        console.print(bench_prune_table(result["prune"], model))
    if "recovery" in result:
        console.print(bench_recovery_table(result["recovery"], model))
    if "eval" in result:
        evaluation = result["eval"]
        console.print(f"eval forward, batch {'x'.join(map(str, evaluation['batch']))}: "
                      f"{evaluation['tokens_per_second_measured']:.4g} tokens/s measured, "
                      f"{evaluation['tokens_per_second_whole_model']:.4g} tokens/s for the whole model")
    if "semi_structured" in result:
        semi = result["semi_structured"]
        for row in semi.get("linears", []):
            verdict = row.get("verdict") or f"failed: {row.get('error')}"
            console.print(f"  2:4 linear {row['example']} {row['shape'][0]}x{row['shape'][1]} "
                          f"over {row['tokens']} tokens: {verdict}")
        console.print(semi["statement"])
    console.print(f"peak memory: {result['memory_measure']}")
    for section in ("eval", *(result.get("recovery", {}).get("methods", []))):
        note = (result.get(section) if isinstance(section, str) else section) or {}
        if isinstance(note, dict) and note.get("note"):
            console.print(f"note: {note.get('method', 'eval')}: {note['note']}")

"""What `python -m benchmarks.prune --peer llmcompressor` measures on the pruned results, and its summary.

Pure functions of the children's weight files and JSON results (no subprocess): the sparsity of every pruned linear
against the pattern, the two tools' agreement, a hash for "bit-identical across repeats", WikiText-2 token
perplexity, and the medians, ratios and the issue's targets per (model, method). benchmarks/real_model.py uses the
same checks.
"""

from __future__ import annotations

import hashlib
import statistics
from pathlib import Path

PERPLEXITY_STREAMS = ("wikitext2", "ppl:builtin:python-docs:test")  # the stream; the tiny model's own domain


def read_linears(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def weights_sha256(weights: dict) -> str:
    import torch

    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def owl_block_targets(run: dict) -> dict[int, float] | None:
    """Block index -> the OWL sparsity a tool's run chose (spp: a list of rows; llm-compressor: name -> value)."""
    found = run.get("owl_block_sparsity")
    if isinstance(found, list):
        return {row["block"]: row["sparsity"] for row in found}
    return {int(name.rsplit(".", 1)[1]): value for name, value in found.items()} if found else None


def check_sparsity(weights: dict, pattern, block_targets: dict[int, float] | None = None) -> dict:
    """Per-linear sparsity of a pruned model's decoder linears against the pattern (and N:M structure), or with
    OWL against each block's own target (Wanda keeps int(c*s) zeros per row: up to 1/c below it)."""
    layer_sparsity = {name: float((weight == 0).float().mean()) for name, weight in weights.items()}
    zeros = sum(int((weight == 0).sum()) for weight in weights.values())
    total = sum(weight.numel() for weight in weights.values())
    # wanda keeps int(c*s) per row, sparsegpt one <= threshold per 128-column block (a few ties over the target)
    ok = all(abs(value - pattern.sparsity) <= 0.005 for value in layer_sparsity.values())
    if block_targets is not None:
        ok = all(abs(value - block_targets[int(name.split(".layers.")[1].split(".")[0])])
                 <= max(0.005, 1 / weights[name].shape[1]) for name, value in layer_sparsity.items())
    if pattern.is_nm:
        ok = ok and all(bool(((weight.reshape(weight.shape[0], -1, pattern.m) == 0).sum(-1) >= pattern.n).all())
                        for weight in weights.values())
    return {"overall": round(zeros / total, 6), "min_layer": round(min(layer_sparsity.values()), 6),
            "max_layer": round(max(layer_sparsity.values()), 6), "linears": len(weights), "matches_target": ok}


def compare_weights(ours: dict, theirs: dict) -> dict:
    """How far spp's pruned linears are from the peer's: mask agreement and largest weight difference."""
    same_mask = sum(int(((ours[name] == 0) == (theirs[name] == 0)).sum()) for name in ours)
    total = sum(weight.numel() for weight in ours.values())
    difference = max(float((ours[name].float() - theirs[name].float()).abs().max()) for name in ours)
    return {"mask_agreement": round(same_mask / total, 6), "max_abs_weight_difference": difference}


def perplexities(model_dir: Path, results: dict[str, Path], seqlen: int, data_dir: str,
                 max_windows: int | None = None) -> dict:
    """Token perplexity (spp_cli.eval.perplexity, batch 8) of the dense model and of each pruned result, whose decoder
    linears are swapped into the one loaded model, on WikiText-2 test and on the tiny model's python-docs test
    (the first `max_windows` windows of each; None: all)."""
    from safetensors.torch import load_file

    from spp_cli.eval.perplexity import perplexity_stream, token_perplexity
    from spp_cli.io.checkpoint import load_model

    model, tokenizer = load_model(str(model_dir))
    streams = {task: perplexity_stream(task, tokenizer, seqlen, data_dir)[0] for task in PERPLEXITY_STREAMS}
    values = {task: {"seqlen": seqlen, "windows": min(stream.shape[1] // seqlen, max_windows or stream.shape[1])}
              for task, stream in streams.items()}
    for label, weights_file in {"dense": None, **results}.items():  # labels: "dense", "METHOD/TOOL"
        if weights_file is not None:
            _, unexpected = model.load_state_dict(load_file(weights_file), strict=False)
            if unexpected:
                raise SystemExit(f"{weights_file}: weights the model does not have: {unexpected[:3]}")
        for task, stream in streams.items():
            values[task][label] = round(token_perplexity(model, stream, seqlen, batch_size=8,
                                                                    max_windows=max_windows)["value"], 4)
    return values


def summarize(label: str, method: str, runs: dict[str, list[dict]], checks: dict, perplexity: dict | None) -> dict:
    """Medians per tool, ratios spp/peer and the issue's targets for one (model, method). Without the peer's runs
    (a --smoke run where it is not installed) only spp's medians and forward passes."""
    keys = ("process_seconds", "prune_seconds", "peak_rss_mb")
    medians = {tool: {key: round(statistics.median(run[key] for run in tool_runs), 3) for key in keys}
               for tool, tool_runs in runs.items()}
    summary = {"model": label, "method": method, "repeats": len(runs["spp"]), "median": medians,
               "ratio_spp_over_peer": None, "checks": checks, "perplexity": perplexity}
    targets = {}
    if "llmcompressor" in medians:
        ratios = summary["ratio_spp_over_peer"] = {
            key: round(medians["spp"][key] / medians["llmcompressor"][key], 3) for key in keys}
        targets.update({
            "process_seconds <= 0.6x peer": ratios["process_seconds"] <= 0.6,
            "prune_seconds <= 0.6x peer": ratios["prune_seconds"] <= 0.6,
            "peak_rss_mb <= peer": ratios["peak_rss_mb"] <= 1.0,
        })
    if "spp-baseline" in medians:
        summary["ratio_spp_over_baseline"] = {
            key: round(medians["spp"][key] / medians["spp-baseline"][key], 3) for key in keys}
        targets["weights bit-identical to the baseline checkout"] = checks["spp_vs_baseline"]["identical_weights"]
    for task, values in (perplexity or {}).items():
        if "llmcompressor" in values:
            values["relative_difference_spp_vs_peer"] = round(values["spp"] / values["llmcompressor"] - 1, 5)
            targets[f"{task} perplexity within 1% of peer"] = abs(values["relative_difference_spp_vs_peer"]) <= 0.01
    if method == "wanda" and all("forward_two_passes_seconds" in run for run in runs["spp"]):
        targets["wanda prune <= 1.5x two forward passes"] = _two_passes(summary, medians, runs) <= 1.5
    if "llmcompressor" in medians and all("forward_floor_seconds" in run for run in runs["spp"]):
        summary["forward_floor"] = forward_floor(medians, runs)
    summary["targets_met"] = targets
    summary["runs"] = runs
    return summary


def _two_passes(summary: dict, medians: dict, runs: dict) -> float:
    """Record spp's Wanda prune time over two plain forward passes (and the capture) in `summary`; the ratio."""
    baseline = statistics.median(run["forward_two_passes_seconds"] for run in runs["spp"])
    capture = statistics.median(run["forward_capture_seconds"] for run in runs["spp"])
    summary["spp_forward_two_passes_seconds"] = round(baseline, 3)
    summary["spp_forward_capture_seconds"] = round(capture, 3)
    summary["spp_wanda_prune_over_two_passes"] = round(medians["spp"]["prune_seconds"] / baseline, 3)
    summary["spp_wanda_prune_over_two_passes_plus_capture"] = round(
        medians["spp"]["prune_seconds"] / (baseline + capture), 3)
    return summary["spp_wanda_prune_over_two_passes"]


def forward_floor(medians: dict, runs: dict) -> dict:
    """What the floor forwards (time_plain_forwards) leave for the ratio to the peer.

    best_process_ratio: spp's process with its prune call replaced by the capture and the floor forwards alone (no
    hook, statistic or solve), over the peer's process; no pruner keeping these masks, with these kernels, does
    better. peer_prune_over_two_passes: how much of the peer's oneshot call is beyond two batch-1 passes."""
    floor = statistics.median(run["forward_floor_seconds"] for run in runs["spp"])
    capture = statistics.median(run["forward_capture_seconds"] for run in runs["spp"])
    two_passes = statistics.median(run["forward_two_passes_seconds"] for run in runs["spp"])
    spp, peer = medians["spp"], medians["llmcompressor"]
    outside_prune = spp["process_seconds"] - spp["prune_seconds"]
    return {"floor_seconds": round(floor, 3), "capture_seconds": round(capture, 3),
            "chunk_windows": runs["spp"][0]["forward_floor_chunk_windows"],
            "spp_prune_over_floor_plus_capture": round(spp["prune_seconds"] / (floor + capture), 3),
            "peer_prune_over_two_passes": round(peer["prune_seconds"] / two_passes, 3),
            "best_prune_ratio": round((floor + capture) / peer["prune_seconds"], 3),
            "best_process_ratio": round((outside_prune + floor + capture) / peer["process_seconds"], 3)}

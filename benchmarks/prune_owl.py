"""`python -m benchmarks.prune --peer llmcompressor --sparsity-profile owl`: both tools' OWL block sparsities.

Both tools follow OWL's recipe (Yin et al. 2024, luuyin/OWL `lib/prune_all.py`): one dense pass over the model,
the Wanda metric |W_ij| * a_j of every linear of a block flattened together, the block's outlier ratio = percent of
entries above M x their mean, then ratios min-max rescaled to a spread of 2 lambda around the target. They differ
in the activation statistic a_j and in the arithmetic, which this module reproduces to say exactly why:

  spp (= the reference): a_j = sqrt(mean over windows of sum over tokens x_j^2), the root of the total sum of
        squares, in fp32 (Wanda's scaler_row); the metric in fp32; the model's own attention (sdpa).
  llm-compressor 0.14 (`SparsityModifierBase._get_activations`): a_j = (1/128) * sum over windows of
        sqrt(sum over tokens x_j^2), a sum of per-window norms (128 is a hard-coded nsamples, a scale that changes
        no ratio); accumulated, multiplied and thresholded in the model's dtype; attention forced to eager
        (calibration_forward_context).

`peer_formula_sparsities` recomputes llm-compressor's block sparsities in this venv from its formula; the report
records the largest difference from what the peer itself inferred (0 when the transcription is exact) and, as a
control, the same transcription with spp's statistic, which must reproduce spp's ratios.

`python -m benchmarks.prune_owl ARGS` is `python -m benchmarks.prune --peer llmcompressor --sparsity-profile owl ARGS`.
Without the peer (a --smoke run where its venv is not there) only spp's ratios and the control are reported.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def _block_sparsities(outlier_ratios: list[float], target: float, lam: float) -> list[float]:
    """The reference's min-max rescale (both tools write it the same way), float64."""
    ratios = np.asarray(outlier_ratios, dtype=np.float64)
    normalised = (ratios - ratios.min()) * (1 / (ratios.max() - ratios.min()) * lam * 2)
    return [float(1 - d) for d in normalised - np.mean(normalised) + (1 - target)]


def formula_sparsities(model_dir: Path, calibration_ids, target: float, threshold: float, lam: float) -> dict:
    """{"llmcompressor": [...], "spp": [...]}: block sparsities by each tool's statistic, from one dense eager pass.

    calibration_ids: (nsamples, seqlen), run one window at a time as both tools do. The model is loaded with
    attn_implementation="eager", as llm-compressor's calibration context forces; spp's own runs use the model's
    default attention, so the "spp" entry here is a control of the transcription, not spp's exact numbers.
    """
    import torch
    import transformers

    from pruners.blocks import find_decoder_blocks

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", attn_implementation="eager")
    model.eval()
    prefix, blocks = find_decoder_blocks(model)
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.startswith(prefix + ".")}
    sum_of_norms: dict[str, torch.Tensor] = {}  # llm-compressor: model dtype, (in,)
    sum_of_squares: dict[str, torch.Tensor] = {}  # spp / reference: fp32, (in,)

    def observe(name: str):
        def hook(module, args):
            x = args[0]  # (1, seqlen, in)
            sum_of_norms[name] = sum_of_norms.get(name, 0) + 1.0 / 128 * x.pow(2).sum(dim=(0, 1)).sqrt()
            sum_of_squares[name] = sum_of_squares.get(name, 0) + x.float().pow(2).sum(dim=(0, 1))
        return hook

    handles = [linear.register_forward_pre_hook(observe(name)) for name, linear in linears.items()]
    with torch.no_grad():
        for window in range(calibration_ids.shape[0]):
            model(input_ids=calibration_ids[window:window + 1], use_cache=False)
    for handle in handles:
        handle.remove()
    nsamples = calibration_ids.shape[0]

    def outlier_ratios(statistic: dict, in_fp32: bool) -> list[float]:
        ratios = []
        for index in range(len(blocks)):
            names = [n for n in linears if n.startswith(f"{prefix}.{index}.")]
            weight = (lambda n: linears[n].weight.float()) if in_fp32 else (lambda n: linears[n].weight)
            metric = torch.cat([(weight(n).abs() * statistic[n].unsqueeze(0)).flatten() for n in names])
            ratios.append(100 * (metric > torch.mean(metric) * threshold).sum().item() / metric.numel())
        return ratios

    reference = {name: (total / nsamples).sqrt() for name, total in sum_of_squares.items()}
    return {"llmcompressor": _block_sparsities(outlier_ratios(sum_of_norms, in_fp32=False), target, lam),
            "spp": _block_sparsities(outlier_ratios(reference, in_fp32=True), target, lam)}


def owl_comparison(runs: dict[str, list[dict]], model_dir: Path, calibration_ids, target: float, threshold: float,
                   lam: float) -> dict:
    """Per block: both tools' OWL sparsity (from their first run) and spp's outlier ratio, their difference, and
    how closely each tool's formula, recomputed here, reproduces it. Without the peer's runs: spp's side only."""
    ours = runs["spp"][0]["owl_block_sparsity"]  # [{"block", "sparsity", "outlier_ratio"}] in block order
    recomputed = formula_sparsities(model_dir, calibration_ids, target, threshold, lam)
    comparison = {
        "threshold_m": threshold, "lambda": lam, "target": target,
        "blocks": [{"block": row["block"], "spp_sparsity": round(row["sparsity"], 6),
                    "spp_outlier_ratio_percent": round(row["outlier_ratio"], 6)} for row in ours],
        "spp_formula_in_eager_attention_max_abs_difference_from_spp": max(
            abs(a - row["sparsity"]) for a, row in zip(recomputed["spp"], ours, strict=True)),
    }
    if "llmcompressor" not in runs:
        return comparison
    theirs = runs["llmcompressor"][0]["owl_block_sparsity"]  # block name -> sparsity
    peer = [theirs[name] for name in sorted(theirs, key=lambda n: int(n.rsplit(".", 1)[1]))]
    for row, spp, value in zip(comparison["blocks"], ours, peer, strict=True):
        row.update(llmcompressor_sparsity=round(value, 6), difference=round(spp["sparsity"] - value, 6))
    return {
        **comparison,
        "max_abs_difference": round(max(abs(b["difference"]) for b in comparison["blocks"]), 6),
        "llmcompressor_reproduced_by_its_formula_max_abs_difference": max(
            abs(a - b) for a, b in zip(recomputed["llmcompressor"], peer, strict=True)),
        "why_they_differ": "the activation statistic: spp (and luuyin/OWL) use sqrt(sum over all windows and "
                           "tokens of x_j^2); llm-compressor sums per-window norms, sum_w sqrt(sum_t x_j^2), and "
                           "computes the metric in the model dtype with eager attention (benchmarks/prune_owl.py)",
    }


def main(argv: list[str] | None = None) -> None:
    from benchmarks import prune

    argv = sys.argv[1:] if argv is None else argv
    prune.main(["--peer", "llmcompressor", "--sparsity-profile", "owl", *argv])


if __name__ == "__main__":
    main()

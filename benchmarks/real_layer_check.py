"""Same layer, same input: block 0's pruned linears from spp and llm-compressor against the reference algorithms.

Block 0 is the one place where both tools' linears see exactly the same input: the dense embeddings of the same
calibration windows go into the dense block 0 (neither tool prunes within a block before all its linears have been
observed: spp's default and llm-compressor's sequential pipeline). So for every linear of block 0 the reference
mask and weights can be computed from those very inputs and each tool's result compared with them:
  Wanda      |W_ij| * sqrt(scaler_row_j), scaler_row the running mean over sequences of sum_t x_tj^2 (Wanda's
             WrappedGPT); per row the int(c/2) smallest (stable sort), or per group of 4 the 2 smallest (topk)
  SparseGPT  benchmarks/reference.py's column-by-column transcription of the reference `fasterprune`
             (blocksize 128, 1% damping) on the reference Hessian (the per-sequence running sum, fp32)
Reported per (method, pattern, tool): the fraction of mask entries equal to the reference's, the weights' relative
Frobenius distance to the reference's (reference rounded to the model dtype), and the relative output error
||(W' - W) X|| / ||W X|| on the first 2048 calibration tokens for the tool and for the reference.

Used by benchmarks/real_model.py (whose --smoke runs it too); runs in spp's venv.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.reference import reference_fasterprune, reference_hessian, reference_wanda

ERROR_TOKENS = 2048  # tokens of X used for the output error (enough for a stable ratio, cheap on two cores)


class _StopAfterBlock(Exception):
    pass


def capture_block0_inputs(model, calibration_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """linear name -> its inputs (nsamples, seqlen, in_features), one window per forward, stopping after block 0."""
    from pruners.blocks import find_decoder_blocks
    from pruners.sequential import prunable_linears

    prefix, blocks = find_decoder_blocks(model)
    linears = {name: linear for name, linear in prunable_linears(model).items()
               if name.startswith(f"{prefix}.0.")}
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    hooks = [linear.register_forward_hook(lambda _m, inputs, _o, name=name: captured[name].append(inputs[0].detach()))
             for name, linear in linears.items()]

    def stop(*_):
        raise _StopAfterBlock

    hooks.append(blocks[0].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for window in calibration_ids:
                try:
                    model(window.unsqueeze(0))
                except _StopAfterBlock:
                    pass
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(chunks) for name, chunks in captured.items()}  # (nsamples, seqlen, c)


def reference_sparsegpt(weight: torch.Tensor, inputs: torch.Tensor, nm: tuple[int, int] | None) -> torch.Tensor:
    n, m = nm or (0, 0)
    pruned, _ = reference_fasterprune(weight, reference_hessian(inputs), 0.5, prunen=n, prunem=m)
    return pruned


def compare(tool_weight: torch.Tensor, reference: torch.Tensor, dense: torch.Tensor, inputs: torch.Tensor) -> dict:
    x = inputs.reshape(-1, inputs.shape[-1])[:ERROR_TOKENS].float()
    dense_out = x @ dense.float().t()

    def output_error(pruned):
        return float(torch.linalg.norm(x @ pruned.float().t() - dense_out) / torch.linalg.norm(dense_out))

    rounded = reference.to(tool_weight.dtype).float()
    return {"mask_agreement_with_reference": round(float(((tool_weight == 0) == (reference == 0)).float().mean()), 6),
            "relative_distance_to_reference": round(float(torch.linalg.norm(tool_weight.float() - rounded)
                                                          / torch.linalg.norm(rounded)), 6),
            "output_error": round(output_error(tool_weight), 6),
            "reference_output_error": round(output_error(reference), 6)}


def round_offset_norms_like_llmcompressor(model) -> int:
    """Give every offset RMSNorm (output * (1 + w): Gemma's) the weight llm-compressor calibrates with.

    llm-compressor 0.14 (modeling/offset_norm.py, CalibrationOffsetNorm) swaps each such norm for one computing
    output * w' with w' = (1 + w.float()).to(w.dtype) during calibration: in bf16 that rounds 1 + w to 8 bits of
    mantissa. Setting w <- (w' - 1) (exact in bf16) makes the original module compute the same. Returns how many.
    """
    count = 0
    for module in model.modules():
        if type(module).__name__ in ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"):
            weight = module.weight.data
            module.weight.data = ((1.0 + weight.float()).to(weight.dtype).float() - 1.0).to(weight.dtype)
            count += 1
    return count


def block0_check(model_dir: Path, calibration_ids: torch.Tensor, weights_files: dict[tuple, Path]) -> dict:
    """{"method pattern": {linear: {tool: comparison}}} for every (method, pattern, tool) in `weights_files`.

    Each tool is compared with the reference on the model's own block-0 inputs ("reference") and, for an offset-norm
    model, with the reference on the inputs llm-compressor's calibration norms produce ("reference_on_peer_norms").
    """
    from safetensors.torch import load_file

    from spp_cli.io.checkpoint import load_model

    model, _ = load_model(str(model_dir), with_tokenizer=False)  # the stored dtype, which both tools pruned in
    inputs = {"reference": capture_block0_inputs(model, calibration_ids)}
    dense = {name: module.weight.detach().clone() for name, module in model.named_modules()
             if name in inputs["reference"]}
    if round_offset_norms_like_llmcompressor(model):
        inputs["reference_on_peer_norms"] = capture_block0_inputs(model, calibration_ids)
    references = {"wanda": reference_wanda, "sparsegpt": reference_sparsegpt}
    result: dict[str, dict] = {}
    cache: dict[tuple, torch.Tensor] = {}
    for (method, pattern, tool), path in weights_files.items():
        nm = None if pattern == "unstructured" else tuple(int(x) for x in pattern.split(":"))
        tool_weights = load_file(path)
        per_linear = result.setdefault(f"{method} {pattern}", {})
        for name in inputs["reference"]:
            entry = per_linear.setdefault(name, {})
            for kind, captured in inputs.items():
                key = (method, pattern, name, kind)
                if key not in cache:
                    cache[key] = references[method](dense[name], captured[name], nm)
                entry.setdefault(tool, {})[kind] = compare(tool_weights[f"{name}.weight"], cache[key], dense[name],
                                                           inputs["reference"][name])
    return {"block": 0, "nsamples": int(calibration_ids.shape[0]), "error_tokens": ERROR_TOKENS,
            "references": list(inputs), "results": result}

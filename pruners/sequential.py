"""The layer-by-layer driver (DESIGN.md, "The sequential driver"): prune any HF decoder one block at a time.

1. Find the decoder blocks from the model itself (`find_decoder_blocks`, pruners/blocks.py).
2. Capture what the model feeds every block, once per calibration batch: the hidden states entering block 0 and
   every keyword argument, per block (`capture_block_inputs`, pruners/blocks.py; no cache object is kept).
3. For each block: move it to `device`; hook its target linears; run every calibration batch through the dense
   block for statistics (a batch stops at the last linear's input, except the first ERROR_WINDOWS windows, whose
   dense outputs are the reference for the reported reconstruction error); prune; run the batches again through
   the pruned block to make the next block's inputs (after the last pruned block, only the error windows: no
   block reads its outputs); move it back; report.
   With true_sequential, the block's linears are split into groups that consume the same input tensor, in the
   order they run ([q,k,v] -> [o] -> [gate,up] -> [down]), and statistics are recollected after each group.
Linears fed the very same input tensor share one set of statistics (q, k and v share one Hessian).
Magnitude needs no forward pass at all.
With a `store` (pruners/streaming.py) the blocks' weights come from it one block at a time and go back to it once
pruned, so the model may be a skeleton without block weights, and the driver may start at a later block (resume).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pruners import PRUNERS, experts, owl
from pruners.blocks import (
    PrunerOptionError,
    UnsupportedModelError,
    block_outputs,
    capture_block_inputs,
    find_decoder_blocks,
    prunable_linears,
)
from pruners.dsnot import DSnoTPruner
from pruners.dsnot import refines as dsnot_refines
from pruners.masks import SparsityPattern
from pruners.observer import LinearObserver
from pruners.reports import BlockReport, LayerReport
from pruners.streaming import BlockStore

CHUNK_TOKENS = 2048  # calibration windows run through a block several at a time, up to this many tokens a forward:
# one-window forwards pay the per-call cost of every op (it dominates small fp16 blocks); much larger forwards lose
# more to cache misses and page faults in the elementwise ops than they gain (Gemma 3 270M, 4 blocks, 2 threads:
# Wanda 5.8 s at 2048 tokens, 7.8 s at 8192; a hidden-1024 fp32 LLaMA 9.8 s against 11.5 s); the statistics stay
# per window
ERROR_WINDOWS = 8  # the block reconstruction error is measured on the first 8 calibration windows: it is a report,
# not an input to pruning, and running every window through the whole dense block only for it cost a sixth of the
# forward work (spec/pruners.md's references report no such error at all)

__all__ = [
    "BlockReport",
    "LayerReport",
    "PrunerOptionError",
    "UnsupportedModelError",
    "find_decoder_blocks",
    "prunable_linears",
    "prune_model",
]


# ---------------------------------------------------------------------------------------------------------------
# the driver


def prune_model(model: nn.Module, calibration_ids: torch.Tensor | None, method: str, pattern: SparsityPattern, *,
                targets: str | None = None, ignore: str | None = None, device: str | torch.device = "cpu",
                true_sequential: bool = False, use_variant: bool = False, batch_size: int = 1,
                sparsity_profile: str = "uniform", owl_threshold: float = owl.DEFAULT_THRESHOLD,
                owl_lambda: float = owl.DEFAULT_LAMBDA, refine: str = "none",
                min_expert_tokens: int = experts.DEFAULT_MIN_TOKENS,
                on_block: Callable[[BlockReport], None] | None = None, store: BlockStore | None = None
                ) -> list[LayerReport]:
    """Prune every target linear of every decoder block of `model` in place, one block at a time.

    calibration_ids: LongTensor (nsamples, seqlen); None is allowed for magnitude only (it is ignored there).
    device: where each block is computed; the model stays on its original device. Calibration activations stay on
    `device` when it is a GPU with room for them, otherwise on CPU.
    batch_size: calibration samples per forward (1 reproduces the references' statistics order).
    sparsity_profile: "uniform" (every block at pattern.sparsity) or "owl" (pruners/owl.py: per-block sparsity from
    the block's outlier ratio with owl_threshold M and owl_lambda; unstructured only; needs calibration_ids).
    refine: "none" or "dsnot" (pruners/dsnot.py: the wanda or sparsegpt initial mask refined by prune-and-grow
    within each row; linears under a block's `mlp` keep the initial mask, the reference default).
    min_expert_tokens: a fused-MoE expert projection (pruners/experts.py) that saw fewer calibration tokens is
    pruned by magnitude instead (its LayerReport says so in `fallback` and `tokens`).
    store: where block weights come from and go (pruners/streaming.py); None when the model holds them all.
    Returns one LayerReport per pruned linear, in block order and, within a block, the order they were pruned
    (with a store: of the blocks from store.first_block on).
    Raises PatternError, UnsupportedModelError, PrunerOptionError (all ValueError) on bad input before any
    weight changes, and CholeskyError (RuntimeError) when SparseGPT fails.
    """
    if method not in PRUNERS:
        raise PrunerOptionError(f"unknown pruning method {method!r}: use one of {', '.join(PRUNERS)}")
    pruner_class = PRUNERS[method]
    if use_variant and method != "wanda":
        raise PrunerOptionError(f"use_variant is a wanda option; {method} has no variant")
    if true_sequential and not pruner_class.needs_calibration:
        raise PrunerOptionError(f"true_sequential needs calibration statistics; {method} uses none")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PrunerOptionError(f"batch_size {batch_size!r} is invalid: use an integer >= 1")
    if refine not in ("none", "dsnot"):
        raise PrunerOptionError(f"unknown refine {refine!r}: use none or dsnot")
    if refine == "dsnot" and method not in ("wanda", "sparsegpt"):
        raise PrunerOptionError(f"refine dsnot refines a wanda or sparsegpt mask; {method} is neither")
    if refine == "dsnot" and use_variant:
        raise PrunerOptionError("refine dsnot starts from wanda's per-row mask; drop use_variant")
    if sparsity_profile not in ("uniform", "owl"):
        raise PrunerOptionError(f"unknown sparsity_profile {sparsity_profile!r}: use uniform or owl")
    if sparsity_profile == "owl":
        if pattern.is_nm:
            raise PrunerOptionError(
                f"sparsity_profile owl needs unstructured sparsity; pattern {pattern} fixes every block at "
                f"{pattern.sparsity:g}: use pattern unstructured or sparsity_profile uniform"
            )
        owl.check_owl_options(owl_threshold, owl_lambda)
    prefix, blocks = find_decoder_blocks(model)
    linears = prunable_linears(model, targets, ignore)
    if not linears:
        raise PrunerOptionError(
            f"no linear layer inside {prefix} matches targets={targets!r} ignore={ignore!r}: loosen the regexes"
        )
    for name, linear in linears.items():
        pattern.check_width(linear.in_features, name)
    per_block: list[dict[str, nn.Linear]] = [{} for _ in blocks]
    for name, linear in linears.items():
        per_block[int(name[len(prefix) + 1:].split(".", 1)[0])][name] = linear
    device = torch.device(device)
    options = {"use_variant": use_variant} if method == "wanda" else {}

    if refine == "dsnot":
        pruner_class = DSnoTPruner

        def make_pruner(name: str) -> Any:
            relative = name[len(prefix) + 1:].split(".", 1)[1]
            return DSnoTPruner(linears[name], name, initial=method, refine=dsnot_refines(relative))
    else:
        def make_pruner(name: str) -> Any:
            return pruner_class(linears[name], name, **options)

    if pruner_class.needs_calibration:  # experts: count routed tokens, fall back to magnitude below the minimum
        make_layer_pruner = make_pruner

        def make_pruner(name: str) -> Any:
            pruner = make_layer_pruner(name)
            if isinstance(linears[name], experts.ExpertLinear):
                return experts.ExpertPruner(pruner, linears[name], name, min_expert_tokens)
            return pruner

    was_training = model.training
    tf32 = torch.backends.cuda.matmul.allow_tf32
    model.eval()
    torch.backends.cuda.matmul.allow_tf32 = False  # the references keep TF32 off (spec §1.2)
    try:
        with torch.no_grad(), experts.eager_experts(blocks):  # no_grad, not inference_mode: the weights must stay
            # usable by autograd afterwards
            patterns, outlier_ratios = [pattern] * len(blocks), [None] * len(blocks)
            if sparsity_profile == "owl":  # a dense pass over every block first, as the reference does
                _check_calibration(calibration_ids, method)
                profile = owl.owl_profile(model, blocks, per_block, calibration_ids,
                                          _batches(calibration_ids, batch_size), device, pattern.sparsity,
                                          owl_threshold, owl_lambda, store)
                patterns = [pattern if s is None else SparsityPattern(s) for s in profile.sparsities]
                outlier_ratios = profile.outlier_ratios
            blocks_report = _block_reporter(on_block, patterns, outlier_ratios)
            if not pruner_class.needs_calibration:
                return _prune_without_data(blocks, per_block, make_pruner, patterns, device, blocks_report, store)
            _check_calibration(calibration_ids, method)
            return _prune_with_data(model, blocks, per_block, make_pruner, patterns, device, calibration_ids,
                                    batch_size, true_sequential, blocks_report, store)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        model.train(was_training)


def _check_calibration(calibration_ids: Any, method: str) -> None:
    if calibration_ids is None:
        raise PrunerOptionError(f"{method} needs calibration data: pass token ids of shape (nsamples, seqlen)")
    if (not isinstance(calibration_ids, torch.Tensor) or calibration_ids.dim() != 2
            or calibration_ids.dtype not in (torch.int64, torch.int32) or calibration_ids.numel() == 0):
        shape = tuple(calibration_ids.shape) if isinstance(calibration_ids, torch.Tensor) else type(calibration_ids)
        raise PrunerOptionError(
            f"calibration ids must be a non-empty integer tensor (nsamples, seqlen), got {shape}"
        )


def _batches(calibration_ids: torch.Tensor, batch_size: int) -> list[slice]:
    nsamples = calibration_ids.shape[0]
    return [slice(s, min(s + batch_size, nsamples)) for s in range(0, nsamples, batch_size)]


def _block_reporter(on_block, patterns, outlier_ratios) -> Callable[..., None]:
    """report(index, seconds, error, error_windows) -> on_block(BlockReport), with the block's sparsity and OWL
    outlier ratio."""

    def report(index: int, seconds: float, error: float, error_windows: int | None = None) -> None:
        if on_block is not None:
            on_block(BlockReport(index, seconds, error, patterns[index].sparsity, outlier_ratios[index], len(patterns),
                                 error_windows))

    return report


def _onload(block: nn.Module, device: torch.device) -> torch.device:
    """Move `block` to `device` (if it is not there); return where it was."""
    home = next(block.parameters()).device
    if home != device:
        block.to(device)
    return home


def _prune_without_data(blocks, per_block, make_pruner, patterns, device, report_block, store
                        ) -> list[LayerReport]:
    reports = []
    for index in range(store.first_block if store is not None else 0, len(blocks)):
        if not per_block[index]:
            continue
        start, block = time.perf_counter(), blocks[index]
        if store is not None:
            store.load_block(index, block)
        home = _onload(block, device)
        block_reports = [make_pruner(name).prune(patterns[index]) for name in per_block[index]]
        reports += block_reports
        _onload(block, home)
        if store is not None:
            store.block_done(index, block, block_reports, None)
        report_block(index, time.perf_counter() - start, math.nan)
    return reports


def _storage_chooser(device: torch.device, blocks: nn.ModuleList, per_block) -> Callable:
    """Keep both activation buffers on a GPU `device` when they fit next to one block and its statistics."""

    def choose(shape: torch.Size, dtype: torch.dtype) -> torch.device:
        if device.type != "cuda":
            return torch.device("cpu")
        buffers = 2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        block_bytes = max(sum(p.numel() * p.element_size() for p in block.parameters()) for block in blocks)
        statistics = max((sum(4 * lin.in_features**2 for lin in linears.values()) for linears in per_block),
                         default=0)
        free = torch.cuda.mem_get_info(device)[0]
        return device if buffers + block_bytes + 2 * statistics < 0.8 * free else torch.device("cpu")

    return choose


def _prune_with_data(model, blocks, per_block, make_pruner, patterns, device, calibration_ids, batch_size,
                     true_sequential, report_block, store) -> list[LayerReport]:
    batches = _batches(calibration_ids, batch_size)
    captured = capture_block_inputs(model, blocks, calibration_ids, batches, device,
                                    _storage_chooser(device, blocks, per_block))
    inputs, outputs = captured.hidden, torch.empty_like(captured.hidden)
    first = store.first_block if store is not None else 0
    last_pruned = max(i for i, linears in enumerate(per_block) if linears)
    if 0 < first <= last_pruned:  # resuming: the capture still gave every block's keyword arguments; the hidden
        # states entering `first` are saved
        inputs.copy_(store.resume_inputs())
    reports: list[LayerReport] = []
    for index in range(first, last_pruned + 1):
        start = time.perf_counter()
        block, calls = blocks[index], captured.calls[index]
        if store is not None:
            store.load_block(index, block)
        home = _onload(block, device)
        block_reports: list[LayerReport] = []
        if per_block[index]:
            block_reports, error = _prune_block(block, per_block[index], make_pruner, patterns[index], inputs,
                                                outputs, calls, batches, device, true_sequential,
                                                next_inputs_needed=index < last_pruned)
            reports += block_reports
        else:  # nothing to prune here: just make the next block's inputs
            for batch, out in block_outputs(block, inputs, calls, batches, device):
                outputs[batch].copy_(out)
            error = 0.0
        _onload(block, home)
        inputs, outputs = outputs, inputs
        if store is not None:  # after the last pruned block there is nothing left to resume
            store.block_done(index, block, block_reports, inputs if index < last_pruned else None)
        if per_block[index]:
            report_block(index, time.perf_counter() - start, error, batches[_error_batches(batches) - 1].stop)
    return reports


def _error_batches(batches: list[slice]) -> int:
    """How many leading batches the reconstruction error is measured on: those holding the first ERROR_WINDOWS."""
    return sum(1 for batch in batches if batch.start < ERROR_WINDOWS)


def _chunk_windows(linears: dict[str, nn.Linear], batches: list[slice], seqlen: int) -> int:
    """Windows per forward: up to CHUNK_TOKENS tokens; 1 for batches of several windows (their captured masks have
    that batch size) and for routed experts (their inputs are the routed tokens of every window of the forward at
    once, so the per-window statistics order would be lost)."""
    if (any(isinstance(linear, experts.ExpertLinear) for linear in linears.values())
            or any(batch.stop - batch.start != 1 for batch in batches)):
        return 1
    return max(1, CHUNK_TOKENS // seqlen)


def _dense_pass(block, linears, make_pruner, active, inputs, outputs, calls, batches, device, measured, chunk
                ) -> tuple[LinearObserver, int]:
    """Statistics of every batch, and the error batches' dense outputs into `outputs`; return the observer (its
    hooks removed) and the chunk size the pruned pass may use.

    With chunk > 1, the first window also runs alone; if the chunked forward does not reproduce it bit for bit
    (another backend, another kernel for another row count), the pass starts again one window a time and 1 is
    returned, so the statistics are always those of one-window forwards.
    """
    alone = None
    if chunk > 1:
        alone = next(block_outputs(block, inputs, calls[:1], batches[:1], device))[1].clone()
    observer = LinearObserver(linears, make_pruner, active=active)
    try:
        for index, (batch, out) in enumerate(block_outputs(block, inputs, calls[:measured], batches[:measured],
                                                           device, observer.end_batch, chunk,
                                                           observer.before_forward)):
            if index == 0 and alone is not None and not torch.equal(out, alone):
                break
            outputs[batch].copy_(out)
        else:
            observer.stop_when_complete()
            for _ in block_outputs(block, inputs, calls[measured:], batches[measured:], device, observer.end_batch,
                                   chunk, observer.before_forward):
                pass  # reached only when the pass could not stop early
            return observer, chunk
    finally:
        observer.remove()
    return _dense_pass(block, linears, make_pruner, active, inputs, outputs, calls, batches, device, measured, 1)


def _prune_block(block, linears, make_pruner, pattern, inputs, outputs, calls, batches, device, true_sequential,
                 next_inputs_needed: bool = True) -> tuple[list[LayerReport], float]:
    """Prune one block (already on `device`); leave its pruned outputs in `outputs`; return reports and error.

    The error batches (`_error_batches`) run through the whole dense block, so their dense outputs can be compared
    with the pruned ones; every other batch is needed for statistics only and stops at the last linear's input.
    With next_inputs_needed False (the last pruned block: nothing reads its outputs) only the error batches run
    through the pruned block, and `outputs` holds pruned outputs for those windows only.
    Forwards run several one-window batches at once (`_chunk_windows`, checked by `_dense_pass`); statistics are
    still accumulated one window at a time, in order.
    """
    measured = _error_batches(batches)
    # dense pass: statistics (of the first group only, when true_sequential) and the error batches' dense outputs
    first_group_only = (lambda group: group == 0) if true_sequential else (lambda group: True)
    observer, chunk = _dense_pass(block, linears, make_pruner, first_group_only, inputs, outputs, calls, batches,
                                  device, measured, _chunk_windows(linears, batches, inputs.shape[1]))
    groups = observer.groups()
    never_called = [name for name in linears if name not in observer.owner]
    unrouted = [name for name in never_called if isinstance(linears[name], experts.ExpertLinear)]  # no tokens:
    # their pruners fall back to magnitude
    if len(unrouted) < len(never_called):
        raise RuntimeError(f"no calibration input reached {', '.join(sorted(set(never_called) - set(unrouted)))}")
    unrouted_reports = [make_pruner(name).prune(pattern) for name in unrouted]
    if not true_sequential:
        reports = observer.prune([name for group in groups for name in group], pattern)
    else:
        reports = observer.prune(groups[0], pattern)
        for group in groups[1:]:  # statistics again, from the block whose earlier groups are pruned
            partial = LinearObserver({name: linears[name] for name in group}, make_pruner, stop_after=group[-1])
            try:
                for _ in block_outputs(block, inputs, calls, batches, device, partial.end_batch, chunk,
                                       partial.before_forward):
                    pass
            finally:
                partial.remove()
            reports += partial.prune(group, pattern)
    reports += unrouted_reports

    # pruned pass: next block's inputs, and the relative reconstruction error against the dense outputs
    squared_error, squared_norm = 0.0, 0.0
    run = len(batches) if next_inputs_needed else measured
    for index, (batch, out) in enumerate(block_outputs(block, inputs, calls[:run], batches[:run], device,
                                                       chunk_windows=chunk)):
        if index < measured:
            dense = outputs[batch].to(out.device).float()
            squared_error += float((out.float() - dense).square().sum())
            squared_norm += float(dense.square().sum())
        outputs[batch].copy_(out)
    return reports, squared_error / squared_norm if squared_norm > 0 else 0.0

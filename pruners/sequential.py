"""The layer-by-layer driver (DESIGN.md, "The sequential driver"): prune any HF decoder one block at a time.

1. Find the decoder blocks from the model itself (`find_decoder_blocks`, pruners/blocks.py).
2. Capture what the model feeds every block, once per calibration batch: the hidden states entering block 0 and
   every keyword argument, per block (`capture_block_inputs`, pruners/blocks.py; no cache object is kept).
3. For each block: move it to `device`; hook its target linears; run every calibration batch through the dense
   block for statistics (a batch stops at the last linear's input, except the leading batches whose dense outputs
   a hook reads: the first ERROR_WINDOWS windows for the reported reconstruction error); prune; run the batches
   again through the pruned block to make the next block's inputs (after the last pruned block, only the dense
   batches: no block reads its outputs); move it back; report.
   With true_sequential, the block's linears are split into groups that consume the same input tensor, in the
   order they run ([q,k,v] -> [o] -> [gate,up] -> [down]), and statistics are recollected after each group.
Linears fed the very same input tensor share one set of statistics (q, k and v share one Hessian).
Magnitude needs no forward pass at all.
What a method adds to this loop (OWL's block sparsities, DSnoT's refined masks, MoE experts' fallback, the error
report) comes in through hooks (pruners/hooks.py) that PruneOptions (pruners/options.py) chooses; the loop knows
none of them.
With a `store` (pruners/streaming.py) the blocks' weights come from it one block at a time and go back to it once
pruned, so the model may be a skeleton without block weights, and the driver may start at a later block (resume).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from functools import partial

import torch
from torch import nn

from pruners.blocks import block_outputs, capture_block_inputs, find_decoder_blocks, prunable_linears
from pruners.errors import PrunerOptionError, UnsupportedModelError
from pruners.hooks import ERROR_WINDOWS, BlockContext, PruneHook, PruneRun
from pruners.observer import LinearObserver
from pruners.options import PruneOptions
from pruners.reports import BlockReport, LayerReport
from pruners.streaming import BlockStore

CHUNK_TOKENS = 2048  # calibration windows run through a block several at a time, up to this many tokens a forward:
# one-window forwards pay the per-call cost of every op (it dominates small fp16 blocks); much larger forwards lose
# more to cache misses and page faults in the elementwise ops than they gain (Gemma 3 270M, 4 blocks, 2 threads:
# Wanda 5.8 s at 2048 tokens, 7.8 s at 8192; a hidden-1024 fp32 LLaMA 9.8 s against 11.5 s); the statistics stay
# per window

__all__ = [
    "ERROR_WINDOWS",
    "BlockReport",
    "LayerReport",
    "PruneOptions",
    "PrunerOptionError",
    "UnsupportedModelError",
    "find_decoder_blocks",
    "prunable_linears",
    "prune_model",
]


# ---------------------------------------------------------------------------------------------------------------
# the driver


def prune_model(model: nn.Module, calibration_ids: torch.Tensor | None, options: PruneOptions, *,
                on_block: Callable[[BlockReport], None] | None = None, store: BlockStore | None = None,
                hooks: Sequence[PruneHook] = ()) -> list[LayerReport]:
    """Prune every target linear of every decoder block of `model` in place, one block at a time.

    calibration_ids: LongTensor (nsamples, seqlen); None is allowed when nothing needs data (magnitude, no OWL).
    options: what to prune and how (pruners/options.py). on_block: told each pruned block's BlockReport.
    store: where block weights come from and go (pruners/streaming.py); None when the model holds them all.
    hooks: more PruneHooks (pruners/hooks.py), after those the options ask for.
    Returns one LayerReport per pruned linear, in block order and, within a block, the order they were pruned
    (with a store: of the blocks from store.first_block on).
    Raises PatternError, UnsupportedModelError, PrunerOptionError (all ValueError) on bad input before any
    weight changes, and CholeskyError (RuntimeError) when SparseGPT fails.
    """
    options.check()
    run = _plan(model, calibration_ids, options, store, [*options.method_hooks(), *hooks])
    was_training, tf32 = model.training, torch.backends.cuda.matmul.allow_tf32
    model.eval()
    torch.backends.cuda.matmul.allow_tf32 = False  # the references keep TF32 off (spec §1.2)
    try:
        # no_grad, not inference_mode: the weights must stay usable by autograd afterwards
        with torch.no_grad(), ExitStack() as started:
            for hook in run.hooks:
                hook.start(run)
                started.callback(hook.finish, run)
            if options.needs_calibration:
                return _prune_with_data(run, on_block)
            return _prune_without_data(run, on_block)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        model.train(was_training)


def _plan(model: nn.Module, calibration_ids: torch.Tensor | None, options: PruneOptions,
          store: BlockStore | None, hooks: list[PruneHook]) -> PruneRun:
    """The blocks and their target linears, checked against the options (nothing changes yet)."""
    prefix, blocks = find_decoder_blocks(model)
    linears = prunable_linears(model, options.targets, options.ignore)
    if not linears:
        raise PrunerOptionError(f"no linear layer inside {prefix} matches targets={options.targets!r} "
                                f"ignore={options.ignore!r}: loosen the regexes")
    for name, linear in linears.items():
        options.pattern.check_width(linear.in_features, name)
    per_block: list[dict[str, nn.Module]] = [{} for _ in blocks]
    for name, linear in linears.items():
        per_block[int(name[len(prefix) + 1:].split(".", 1)[0])][name] = linear
    batches = []
    if options.needs_calibration or any(hook.needs_calibration for hook in hooks):
        _check_calibration(calibration_ids, options.method)
        nsamples = calibration_ids.shape[0]
        batches = [slice(s, min(s + options.batch_size, nsamples)) for s in range(0, nsamples, options.batch_size)]
    return PruneRun(model, prefix, blocks, linears, per_block, options.pattern, torch.device(options.device),
                    calibration_ids, batches, options.true_sequential, store, hooks, options.build_pruner)


def _check_calibration(calibration_ids: object, method: str) -> None:
    if calibration_ids is None:
        raise PrunerOptionError(f"{method} needs calibration data: pass token ids of shape (nsamples, seqlen)")
    if (not isinstance(calibration_ids, torch.Tensor) or calibration_ids.dim() != 2
            or calibration_ids.dtype not in (torch.int64, torch.int32) or calibration_ids.numel() == 0):
        shape = tuple(calibration_ids.shape) if isinstance(calibration_ids, torch.Tensor) else type(calibration_ids)
        raise PrunerOptionError(
            f"calibration ids must be a non-empty integer tensor (nsamples, seqlen), got {shape}"
        )


def _onload(block: nn.Module, device: torch.device) -> torch.device:
    """Move `block` to `device` (if it is not there); return where it was."""
    home = next(block.parameters()).device
    if home != device:
        block.to(device)
    return home


def _block(run: PruneRun, index: int, **data) -> BlockContext:
    """Block `index`, on the device, and its context; hooks' begin_block has run."""
    block = BlockContext(index, run.blocks[index], run.per_block[index], run.pattern,
                         BlockReport(index, 0.0, math.nan, total=len(run.blocks)), run.make_pruner, run.device,
                         **data)
    for hook in run.hooks:
        hook.begin_block(block)
    return block


def _report(block: BlockContext, start: float, on_block: Callable[[BlockReport], None] | None) -> None:
    block.report.seconds = time.perf_counter() - start
    block.report.sparsity = block.pattern.sparsity
    if on_block is not None:
        on_block(block.report)


def _prune_without_data(run: PruneRun, on_block) -> list[LayerReport]:
    reports = []
    for index in range(run.first_block, len(run.blocks)):
        if not run.per_block[index]:
            continue
        start, module = time.perf_counter(), run.blocks[index]
        if run.store is not None:
            run.store.load_block(index, module)
        home = _onload(module, run.device)
        block = _block(run, index)
        block.reports = [run.make_pruner(name).prune(block.pattern) for name in block.linears]
        for hook in run.hooks:
            hook.after_prune(block)
        for hook in run.hooks:
            hook.end_block(block)
        reports += block.reports
        _onload(module, home)
        if run.store is not None:
            run.store.block_done(index, module, block.reports, None)
        _report(block, start, on_block)
    if run.store is not None:
        run.store.flush()
    return reports


def _activation_device(run: PruneRun, shape: torch.Size, dtype: torch.dtype) -> torch.device:
    """Keep both activation buffers on a GPU device when they fit next to one block and its statistics."""
    if run.device.type != "cuda":
        return torch.device("cpu")
    buffers = 2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    block_bytes = max(sum(p.numel() * p.element_size() for p in block.parameters()) for block in run.blocks)
    statistics = max((sum(4 * lin.in_features**2 for lin in linears.values()) for linears in run.per_block),
                     default=0)
    free = torch.cuda.mem_get_info(run.device)[0]
    return run.device if buffers + block_bytes + 2 * statistics < 0.8 * free else torch.device("cpu")


def _prune_with_data(run: PruneRun, on_block) -> list[LayerReport]:
    captured = capture_block_inputs(run.model, run.blocks, run.calibration_ids, run.batches, run.device,
                                    partial(_activation_device, run))
    inputs, outputs = captured.hidden, torch.empty_like(captured.hidden)
    first, last_pruned = run.first_block, max(i for i, linears in enumerate(run.per_block) if linears)
    if 0 < first <= last_pruned:  # resuming: the capture still gave every block's keyword arguments; the hidden
        # states entering `first` are saved
        inputs.copy_(run.store.resume_inputs())
    dense_windows = max((hook.dense_windows for hook in run.hooks), default=0)
    # at least one: the first batch runs the whole dense block to check chunked forwards (_dense_pass)
    dense_batches = max(1, sum(1 for batch in run.batches if batch.start < dense_windows))
    reports: list[LayerReport] = []
    for index in range(first, last_pruned + 1):
        start, module, block = time.perf_counter(), run.blocks[index], None
        if run.store is not None:
            run.store.load_block(index, module)
        home = _onload(module, run.device)
        if run.per_block[index]:
            block = _block(run, index, inputs=inputs, outputs=outputs, calls=captured.calls[index],
                           batches=run.batches, dense_batches=dense_batches)
            _prune_block(run, block, next_inputs_needed=index < last_pruned)
            reports += block.reports
        else:  # nothing to prune here: just make the next block's inputs
            for batch, out in block_outputs(module, inputs, captured.calls[index], run.batches, run.device):
                outputs[batch].copy_(out)
        _onload(module, home)
        inputs, outputs = outputs, inputs
        if run.store is not None:  # after the last pruned block there is nothing left to resume
            run.store.block_done(index, module, block.reports if block else [],
                                 inputs if index < last_pruned else None)
        if block is not None:
            _report(block, start, on_block)
    if run.store is not None:
        run.store.flush()
    return reports


def _chunk_windows(linears: dict[str, nn.Module], batches: list[slice], seqlen: int) -> int:
    """Windows per forward: up to CHUNK_TOKENS tokens; 1 for batches of several windows (their captured masks have
    that batch size) and for routed linears (MoE experts: their inputs are the routed tokens of every window of the
    forward at once, so the per-window statistics order would be lost)."""
    if (any(getattr(linear, "routed", False) for linear in linears.values())
            or any(batch.stop - batch.start != 1 for batch in batches)):
        return 1
    return max(1, CHUNK_TOKENS // seqlen)


def _prune_block(run: PruneRun, block: BlockContext, next_inputs_needed: bool) -> None:
    """Prune one block (on the device, begin_block run); leave its pruned outputs in block.outputs.

    With next_inputs_needed False (the last pruned block: nothing reads its outputs) only the dense batches run
    through the pruned block, and block.outputs holds pruned outputs for those windows only.
    Forwards run several one-window batches at once (`_chunk_windows`, checked by `_dense_pass`); statistics are
    still accumulated one window at a time, in order.
    """
    first_group_only = (lambda group: group == 0) if run.true_sequential else (lambda group: True)
    observer, chunk = _dense_pass(block, first_group_only,
                                  _chunk_windows(block.linears, block.batches, block.inputs.shape[1]))
    block.unobserved = [name for name in block.linears if name not in observer.owner]
    for hook in run.hooks:
        hook.after_statistics(block)
    if block.unobserved:
        raise RuntimeError(f"no calibration input reached {', '.join(sorted(block.unobserved))}")
    block.reports = _prune_observed(block, observer, chunk, run.true_sequential) + block.reports
    for hook in run.hooks:
        hook.after_prune(block)
    count = len(block.batches) if next_inputs_needed else block.dense_batches
    for batch, out in block_outputs(block.module, block.inputs, block.calls[:count], block.batches[:count],
                                    block.device, chunk_windows=chunk):
        for hook in run.hooks:
            hook.pruned_output(block, batch, out)
        block.outputs[batch].copy_(out)
    for hook in run.hooks:
        hook.end_block(block)


def _dense_pass(block: BlockContext, active: Callable[[int], bool], chunk: int) -> tuple[LinearObserver, int]:
    """Statistics of every batch, and the dense batches' outputs into block.outputs; return the observer (its hooks
    removed) and the chunk size the pruned pass may use: `chunk`, or 1 when chunked forwards did not reproduce a
    one-window forward bit for bit (another backend, another kernel for another row count), so the statistics are
    always those of one-window forwards."""
    if chunk > 1:
        alone = next(block_outputs(block.module, block.inputs, block.calls[:1], block.batches[:1], block.device))
        observer = _observe(block, active, chunk, alone[1].clone())
        if observer is not None:
            return observer, chunk
    return _observe(block, active, 1), 1


def _observe(block: BlockContext, active: Callable[[int], bool], chunk: int,
             alone: torch.Tensor | None = None) -> LinearObserver | None:
    """One dense pass: the dense batches through the whole block (outputs kept), the others up to the last linear's
    input. None when the first batch's output differs from `alone` (the same window run by itself)."""
    observer = LinearObserver(block.linears, block.make_pruner, active=active)
    measured = block.dense_batches
    try:
        for index, (batch, out) in enumerate(block_outputs(
                block.module, block.inputs, block.calls[:measured], block.batches[:measured], block.device,
                observer.end_batch, chunk, observer.before_forward)):
            if index == 0 and alone is not None and not torch.equal(out, alone):
                return None
            block.outputs[batch].copy_(out)
        observer.stop_when_complete()
        for _ in block_outputs(block.module, block.inputs, block.calls[measured:], block.batches[measured:],
                               block.device, observer.end_batch, chunk, observer.before_forward):
            pass  # reached only when the pass could not stop early
        return observer
    finally:
        observer.remove()


def _prune_observed(block: BlockContext, observer: LinearObserver, chunk: int, true_sequential: bool
                    ) -> list[LayerReport]:
    """Prune every linear the dense pass observed, groups in call order; with true_sequential, each group after the
    first is observed again through the block whose earlier groups are pruned."""
    groups = observer.groups()
    if not true_sequential:
        return observer.prune([name for group in groups for name in group], block.pattern)
    reports = observer.prune(groups[0], block.pattern)
    for group in groups[1:]:
        partial_observer = LinearObserver({name: block.linears[name] for name in group}, block.make_pruner,
                                          stop_after=group[-1])
        try:
            for _ in block_outputs(block.module, block.inputs, block.calls, block.batches, block.device,
                                   partial_observer.end_batch, chunk, partial_observer.before_forward):
                pass
        finally:
            partial_observer.remove()
        reports += partial_observer.prune(group, block.pattern)
    return reports

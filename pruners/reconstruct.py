"""Block-wise reconstruction (EBFT: Guo et al., arXiv 2402.12419; code github.com/sunggo/EBFT @ 76ded25).

After a block's masks are chosen, train the kept weights of its target linears (mask fixed) so that the sparse block
reproduces the dense block's outputs on the calibration windows; then the driver's pruned pass feeds the next block
as before. `BlockReconstruction` is a driver hook (pruners/hooks.py) that does this in `after_prune`. With
reconstruct_params spp or masked-lora, an adapter of each target linear trains instead of its kept weights, with the
same loop and settings, and is merged into the linear as soon as the block has trained (pruners/reconstruct_params.py).

What EBFT does, from its code (file:line in sunggo/EBFT):
- inputs: the *pruned* model's block inputs. Each block's dense outputs are computed on `inps` before its masks
  (lib/prune_ft.py:195-198), the block is trained on (inps, outs) (prune_ft.py:237), then the pruned block's outputs
  on the same `inps` become the next block's inputs (prune_ft.py:250-254: `inps, outs = outs, inps`).
- targets: the dense block's outputs on those same inputs (prune_ft.py:197-198, before the masks of 202-233).
- loss: mean squared error over every element, `nn.MSELoss(reduction="mean")` (lib/finetune.py:43, 55-56).
- optimizer: AdamW (finetune.py:109-113), betas (0.9, 0.95) (lib/options.py:18-19), weight decay 0.1
  (options.py:17), gradients clipped to norm 1.0 (options.py:20; finetune.py:61-62).
- lr: 2e-4, the README's published command (README.md: `--learning_rate 0.0002`); the argparse default is 0.01
  (options.py:15). Schedule: linear decay to 0 after a linear warmup (`get_linear_schedule_with_warmup`,
  finetune.py:114-116) of 0 steps (options.py:21), over epochs x (nsamples // batch_size) steps (finetune.py:36-39).
- epochs 10 (options.py:25); batch 8 windows (options.py:22), reshuffled every epoch (finetune.py:49-53);
  calibration 256 windows (options.py:6) of 1024 tokens (options.py:26).
- what trains: every block parameter whose name lacks "mask" (finetune.py:40, 101-105, 125-128); the masked
  linear computes with mask * weight (lib/linear_type.py:52), so a pruned entry gets no gradient, and after training
  weight = mask * weight (prune_ft.py:244-247): the mask is fixed.
- precision: fp32 weights (main.py:27-33), an fp16 autocast forward and a GradScaler (finetune.py:9-14, 54-64).

Here, deliberately different (each says why):
- Only the kept weights of the block's target linears train; norms and untargeted linears stay the parent's, so
  the checkpoint differs from its parent only where spp.json lists a pruned layer.
- The mask is the block's zeros after pruning: their gradients are zeroed and they are re-zeroed after every step,
  so the zeros (N:M groups too) are exactly the unrefined masks'. A kept weight that the cast back to the stored
  dtype would round to zero keeps its pruned value instead (no extra zero appears).
- The gradient norm clipped to 1.0 is the true gradient's. EBFT clips the fp16-*scaled* gradients (clip before
  `scaler.step`'s unscale), which caps the true norm at 1/65536 and leaves Adam's eps dominant.
- Fp32 master copies of the trained weights; the forward and backward run in the block's dtype (fp16 with a dynamic
  loss scale), in eval mode (no dropout; LLaMA has none) so a run is deterministic.
- The schedule counts the steps that run: epochs x ceil(nsamples / batch_size).
- Windows are shuffled by a generator seeded from (seed, block index), so a streamed prune resumed at a later block
  trains it exactly as an uninterrupted run does.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pruners.blocks import _same_call, block_outputs
from pruners.errors import PrunerOptionError
from pruners.hooks import ERROR_WINDOWS, BlockContext, PruneHook, PruneRun, error_terms
from pruners.reconstruct_params import RECONSTRUCT_PARAMS, Trainable, trainable

ADAM_BETAS = (0.9, 0.95)  # EBFT lib/options.py:18-19
MAX_GRAD_NORM = 1.0  # EBFT lib/options.py:20
FP16_INITIAL_SCALE = 2.0**16  # torch's GradScaler's initial scale, as EBFT's (finetune.py:14)


@dataclass(frozen=True)
class ReconstructSettings:
    """How each block trains; the defaults are EBFT's (module docstring)."""

    epochs: int = 10
    lr: float = 2e-4
    batch_size: int = 8  # calibration windows per step
    weight_decay: float = 0.1
    warmup_steps: int = 0
    seed: int = 0  # with the block index, seeds the window order (and an adapter's initial values)
    params: str = "weights"  # what trains: pruners/reconstruct_params.py (weights | spp | masked-lora)

    def check(self) -> None:
        """Raise PrunerOptionError for settings that cannot train."""
        if self.params not in RECONSTRUCT_PARAMS:
            raise PrunerOptionError(f"unknown reconstruct_params {self.params!r}: use one of "
                                    f"{', '.join(RECONSTRUCT_PARAMS)}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PrunerOptionError(f"reconstruct_{name} {value!r} is invalid: use an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise PrunerOptionError(f"seed {self.seed!r} is invalid: use an integer >= 0")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise PrunerOptionError(f"reconstruct_warmup_steps {self.warmup_steps!r} is invalid: use an integer >= 0")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise PrunerOptionError(f"reconstruct_lr {self.lr!r} is invalid: use a number > 0")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise PrunerOptionError(f"reconstruct_weight_decay {self.weight_decay!r} is invalid: use a number >= 0")


def linear_warmup_decay(warmup_steps: int, total_steps: int):
    """The lr factor of step k (0-based), as transformers' get_linear_schedule_with_warmup: k / warmup during the
    warmup, then linearly down to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def relative_error(block: BlockContext, windows: int = ERROR_WINDOWS) -> float:
    """||Y - Ŷ||² / ||Y||² over the batches starting below `windows`: Y the dense outputs in block.outputs, Ŷ the
    block as it is now, fed block.inputs (ReconstructionError's measure, in pruners/hooks.py)."""
    count = sum(1 for batch in block.batches if batch.start < windows)
    squared_error = squared_norm = 0.0
    for batch, out in block_outputs(block.module, block.inputs, block.calls[:count], block.batches[:count],
                                    block.device):
        terms = error_terms(out, block.outputs[batch])
        squared_error, squared_norm = squared_error + terms[0], squared_norm + terms[1]
    return squared_error / squared_norm if squared_norm > 0 else 0.0


def _windows_batch_freely(block: BlockContext) -> bool:
    return (all(batch.stop - batch.start == 1 for batch in block.batches)
            and all(_same_call(call, block.calls[0]) for call in block.calls))


def steps_per_epoch(block: BlockContext, batch_size: int) -> int:
    """How many steps `minibatches` yields."""
    return math.ceil(len(block.batches) / batch_size) if _windows_batch_freely(block) else len(block.batches)


def minibatches(block: BlockContext, batch_size: int, generator: torch.Generator
                ) -> Iterator[tuple[torch.Tensor, tuple[tuple, dict]]]:
    """(window indices, the call to replay) of each step of one epoch, in a shuffled order.

    When every driver batch is one window and the model passed every window the very same values (plain text:
    the same positions, no padding), windows are shuffled and grouped `batch_size` at a time, as EBFT's DataLoader
    does; otherwise (padded or multi-window driver batches carry per-batch masks) each driver batch is one step.
    """
    if _windows_batch_freely(block):
        order = torch.randperm(len(block.batches), generator=generator)
        for first in range(0, len(order), batch_size):
            yield order[first:first + batch_size], block.calls[0]
        return
    for index in torch.randperm(len(block.batches), generator=generator).tolist():
        batch = block.batches[index]
        yield torch.arange(batch.start, batch.stop), block.calls[index]


def train_block(block: BlockContext, settings: ReconstructSettings) -> None:
    """Train what settings.params names (pruners/reconstruct_params.py: the kept weights of block.linears, or an
    adapter of each merged into it at the end) to minimise MSE(block(x), dense block(x)) over the calibration windows
    (x = block.inputs, targets block.outputs); the block's other parameters and every zero stay as they are."""
    module = block.module
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + block.index)
    initial = torch.Generator().manual_seed(settings.seed * 1_000_003 + block.index)  # an adapter's initial values
    trained = trainable(settings.params, module, block.linears, initial)
    dtype = next(iter(block.linears.values())).weight.dtype
    requires_grad = {parameter: parameter.requires_grad for parameter in module.parameters()}
    module.requires_grad_(False)
    trained.attach()
    optimizer = torch.optim.AdamW(trained.parameters, lr=settings.lr, betas=ADAM_BETAS,
                                  weight_decay=settings.weight_decay)
    total_steps = settings.epochs * steps_per_epoch(block, settings.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(settings.warmup_steps, total_steps))
    scale = FP16_INITIAL_SCALE if dtype == torch.float16 else 1.0
    try:
        with torch.enable_grad():
            for _ in range(settings.epochs):
                for windows, (args, kwargs) in minibatches(block, settings.batch_size, generator):
                    scale = _step(block, windows, args, kwargs, trained, optimizer, scale)
                    schedule.step()
        trained.merge()
    finally:
        trained.detach()
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)


def _step(block: BlockContext, windows: torch.Tensor, args: tuple, kwargs: dict, trained: Trainable,
          optimizer: torch.optim.Optimizer, scale: float) -> float:
    """One optimizer step on `windows`; returns the loss scale for the next (halved after a non-finite fp16 step,
    which is skipped, as GradScaler does)."""
    inputs = block.inputs[windows].to(block.device)  # (windows, seqlen, hidden)
    target = block.outputs[windows].to(block.device).float()
    out = block.module(inputs, *args, **kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out  # transformers < 5 return a tuple
    loss = F.mse_loss(out.float(), target)
    if not torch.isfinite(loss):
        raise RuntimeError(f"reconstruct: block {block.index}'s loss is {float(loss)}; lower reconstruct_lr")
    (loss * scale).backward()
    if not trained.unscaled_gradients(scale):
        if scale == 1.0:
            raise RuntimeError(f"reconstruct: block {block.index}'s gradients are not finite; lower reconstruct_lr")
        optimizer.zero_grad(set_to_none=True)
        return scale / 2
    torch.nn.utils.clip_grad_norm_(trained.parameters, MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    trained.after_step()
    return scale


class BlockReconstruction(PruneHook):
    """EBFT's block-wise reconstruction after each block's masks (and after DSnoT's refinement when it runs).

    Reads every window's dense outputs (dense_windows: all of them), so it comes after ReconstructionError among the
    hooks, whose end_block it reads: each BlockReport gets `error_before_reconstruct` (the same measure on the masks
    before training) beside `reconstruction_error`, and each LayerReport of the block carries both (a streamed run
    keeps LayerReports across a resume, so spp.json has every block's pair).
    """

    needs_calibration = True
    dense_windows = sys.maxsize  # every calibration window is a training example

    def __init__(self, settings: ReconstructSettings) -> None:
        self.settings = settings
        self.before = math.nan

    def start(self, run: PruneRun) -> None:
        fused = [name for name, linear in run.linears.items() if not isinstance(linear, nn.Linear)]
        if fused:
            raise PrunerOptionError(f"refine reconstruct trains nn.Linear weights; {fused[0]} is a fused MoE expert "
                                    "projection: ignore the experts (--ignore) or drop reconstruct")

    def after_prune(self, block: BlockContext) -> None:
        self.before = relative_error(block)
        train_block(block, self.settings)

    def end_block(self, block: BlockContext) -> None:
        block.report.error_before_reconstruct = self.before
        errors = {"block": block.index, "before": self.before, "after": block.report.reconstruction_error}
        for report in block.reports:
            report.reconstruct = dict(errors)

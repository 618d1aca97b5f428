"""Recovery step seconds and peak memory of every `spp finetune --method`, against PEFT LoRA r=8 (method `lora` at
its defaults: r 8, alpha 16, dropout 0.05) on the same batch, seqlen, dtype and target linears; then each method's
merge seconds and whether the merged weights kept every zero.

A step is forward + backward + AdamW step (+ the method's after-step hook) on one batch of random token ids, as the
fine-tune stage runs it: on a GPU the weights in the bench dtype under autocast of that dtype, with a GradScaler
for float16 (the Trainer's fp16 loss scaling); in float32 on a CPU. Each method is measured at depth 1 and at the
built depth (spp_cli/bench/measure.py's straight line) and extrapolated to the real depth: step seconds directly,
peak memory as the built model's plus, per missing block, its training slope and its frozen weights.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from spp_cli.bench.measure import at_depth, fit_depths, peak_memory, release, synchronize, timed
from spp_cli.errors import first_line

BASELINE = "lora"  # PEFT's LoRA, r 8: the method every other is compared with


def precision_name(dtype: torch.dtype, device: str) -> str:
    if not device.startswith("cuda") or dtype == torch.float32:
        return str(dtype).removeprefix("torch.")
    name = str(dtype).removeprefix("torch.")
    return f"autocast({name})" + (" + GradScaler" if dtype == torch.float16 else "")


class TrainStep:
    """One optimizer step of an adapted model, in the fine-tune stage's precision."""

    def __init__(self, model: nn.Module, adapter, device: str, dtype: torch.dtype, lr: float):
        self.model, self.adapter, self.device = model, adapter, device
        self.autocast = device.startswith("cuda") and dtype in (torch.bfloat16, torch.float16)
        self.dtype = dtype
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast and dtype == torch.float16 else None

    def __call__(self, batch: torch.Tensor) -> float:
        context = (torch.autocast("cuda", dtype=self.dtype) if self.autocast else contextlib.nullcontext())
        with context:
            loss = self.model(input_ids=batch, labels=batch).loss
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.adapter.after_optimizer_step(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def adapted_copy(base: nn.Module, method: str, targets: list[str], device: str):
    """(the HF model inside, the model to train, its adapter): a copy of `base` on `device` with `method` at its
    defaults on `targets`."""
    from spp_cli.adapters import adapter_class
    from spp_cli.recipe.schema import FinetuneStage

    inner = copy.deepcopy(base).to(device)
    adapter = adapter_class(method).from_options(FinetuneStage(data="unused", method=method))
    model = adapter.inject(inner, list(targets))
    model.train()
    return inner, model, adapter


def _zero_masks(model: nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    return {name: (model.get_submodule(name).weight == 0) for name in targets}


def _merge(inner: nn.Module, model: nn.Module, adapter, targets: list[str], device: str) -> tuple[float, bool]:
    """Merge seconds, and whether every zero of the targets survived the merge."""
    before = _zero_masks(inner, targets)
    synchronize(device)
    start = time.perf_counter()
    merged = adapter.merge(model)
    synchronize(device)
    seconds = time.perf_counter() - start
    after = _zero_masks(merged, targets)
    return seconds, all(bool((after[name] | ~zero).all()) for name, zero in before.items())


def measure_method(base: nn.Module, method: str, batch: torch.Tensor, sizes: dict, device: str,
                   dtype: torch.dtype) -> dict:
    """Step seconds, peak memory, merge seconds of `method`, at depth 1 and depth sizes["blocks"], extrapolated to
    sizes["real_depth"]. `base` lives in CPU memory; each method trains its own copy on the device."""
    from spp_cli.adapters import REGISTRY

    targets, depth, real_depth = sizes["targets"], sizes["blocks"], sizes["real_depth"]
    start_bytes = peak_memory_start(device)
    inner, model, adapter = adapted_copy(base, method, targets, device)
    step = TrainStep(model, adapter, device, dtype, REGISTRY[method].default_lr)
    seconds, peaks = {}, {}
    for k in sorted({1, depth}):  # memory first, depth 1 before depth B: the optimizer's state grows with depth
        with at_depth(inner, k):
            step(batch)  # warm-up: the optimizer's state of these blocks, first-call costs
            with peak_memory(device) as peak:
                step(batch)
        peaks[k] = None if peak["bytes"] is None or start_bytes is None else peak["bytes"] - start_bytes
    for k in sorted({1, depth}):  # then time, everything warm
        with at_depth(inner, k):
            seconds[k] = timed(device, partial(step, batch), sizes["steps"], warmup=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    merge_seconds, zeros_kept = _merge(inner, model, adapter, targets, device)
    del inner, model, adapter, step
    release(device)
    time_fit = fit_depths(seconds[1], seconds[depth], depth)
    row = {"method": method, "keeps_zeros": REGISTRY[method].keeps_zeros, "trainable_params": trainable,
           "step_seconds": {f"depth_{k}": s for k, s in seconds.items()},
           "step_seconds_per_block": time_fit.per_block, "step_seconds_whole_model": time_fit.at(real_depth),
           "peak_memory_bytes": {f"depth_{k}": b for k, b in peaks.items()},
           "peak_memory_bytes_whole_model": _whole_memory(peaks, depth, real_depth, sizes["block_bytes"]),
           "merge_seconds_measured": merge_seconds, "merge_seconds_whole_model": merge_seconds / depth * real_depth,
           "zeros_kept_after_merge": zeros_kept if REGISTRY[method].keeps_zeros else None}
    if time_fit.note:
        row["note"] = time_fit.note
    return row


def peak_memory_start(device: str) -> int | None:
    with peak_memory(device) as now:
        pass
    return now["start"]


def _whole_memory(peaks: dict, depth: int, real_depth: int, block_bytes: int) -> int | None:
    if any(value is None for value in peaks.values()):
        return None
    slope = fit_depths(peaks[1], peaks[depth], depth).per_block if depth > 1 else 0.0
    if depth > 1 and peaks[depth] <= peaks[1]:
        slope = 0.0  # no measurable growth per block: only the frozen weights of the missing blocks are added
    return int(peaks[depth] + (real_depth - depth) * (slope + block_bytes))


def bench_recovery(base: nn.Module, methods: list[str], batch: torch.Tensor, sizes: dict, device: str,
                   dtype: torch.dtype, tell: Callable[[str], None]) -> dict:
    """Every method's row (the baseline first), with its step and memory ratios to the baseline's."""
    import peft  # noqa: F401  (imported before any measurement: the baseline would pay for it otherwise)

    from spp_cli.adapters import adapter_class

    ordered = [BASELINE] + [m for m in methods if m != BASELINE]
    for method in ordered:
        adapter_class(method)
    rows = []
    for method in ordered:
        tell(f"bench: recovery step {method}, batch {tuple(batch.shape)}")
        try:
            rows.append(measure_method(base, method, batch, sizes, device, dtype))
        except Exception as error:  # e.g. out of memory, or a method that cannot train in this dtype
            release(device)
            rows.append({"method": method, "error": f"{type(error).__name__}: {first_line(error)}"})
    baseline = rows[0] if "error" not in rows[0] else None
    for row in rows:
        if baseline is not None and "error" not in row:
            row["step_ratio_vs_lora"] = row["step_seconds_whole_model"] / baseline["step_seconds_whole_model"]
            memory, reference = row["peak_memory_bytes_whole_model"], baseline["peak_memory_bytes_whole_model"]
            row["memory_ratio_vs_lora"] = memory / reference if memory and reference else None
    return {"baseline": "lora (PEFT LoRA, r 8, alpha 16, dropout 0.05)", "precision": precision_name(dtype, device),
            "batch": list(batch.shape), "methods": rows}

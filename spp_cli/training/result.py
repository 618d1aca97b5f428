"""What a fine-tune produced, and what is done with it after training: the FinetuneResult (assembled from the
Trainer's state on every rank: the loss curve, the gathered trainable state), the adapters put back on a fresh or
weightless copy of the frozen base after a multi-process run, the merge and the adapter's save.

    result = run_finetune(...)                # spp_cli/training/trainer.py
    merged = merge_trained(result)            # result.adapter.keeps_zeros: same zeros; lora: dense
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spp_cli.adapters.base import Adapter
from spp_cli.training.run_record import parallelism


@dataclass
class FinetuneResult:
    """What a fine-tune produced. `model` still carries its adapters (or is PEFT's wrapper); `adapter` knows how
    to merge and save it."""

    model: nn.Module
    adapter: Adapter
    train_curve: list[dict]  # [{"step", "loss", "lr"}] as logged every logging_steps, and at the last step
    eval_loss: float | None
    seconds: float  # training only (checkpoint saves included): the held-out evaluations are eval_seconds
    steps: int
    resumed_from: str | None  # the checkpoint this run resumed from, if any
    trainable_params: int
    targets: list[str]
    adapter_state: dict[str, torch.Tensor]  # trained parameters by name, full (gathered) CPU tensors
    is_main_process: bool = True
    steps_run: int = 0  # optimizer steps run by this process (fewer than `steps` after a resume)
    peak_memory_mb: float | None = None  # CUDA: max allocated during training; CPU: training_state_bytes
    memory_measure: str = ""
    parallelism: str = "single"  # what the Trainer really ran: single | ddp | fsdp1 | fsdp2 | deepspeed
    eval_seconds: float = 0.0  # the held-out evaluations of this run
    applied: dict = dataclasses.field(default_factory=dict)  # what ran: applied_options' record
    kl_curve: list[dict] = dataclasses.field(default_factory=list)  # distill: [{"step", "kl"}] beside train_curve
    curve: list[dict] | None = None  # with options.eval_steps: [{"step", "train_tokens", "held_out_loss"[, "ppl"]}]
    curve_ppl: dict | None = None  # how the curve's ppl was measured (training/curve.py perplexity_probe)

    @property
    def method(self) -> str:
        return self.adapter.name


def trained_result(trainer, adapter: Adapter, target_names: list[str], resume: str | None, seconds: float,
                   eval_loss: float | None, measured_memory: tuple[float | None, str]) -> FinetuneResult:
    """The FinetuneResult: the loss curve, the gathered trainable state (a collective: every rank), the unwrapped
    model, and `seconds` (training and evaluations) split into training and evaluation time."""
    # from trainer.state.log_history, which a resumed run restores, so the curve covers the whole training
    curve = [{"step": e["step"], "loss": e["loss"], "lr": e.get("learning_rate")}
             for e in trainer.state.log_history if "loss" in e]
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    adapter_state = _gather_trainable(trainer, trained)
    if trainer.is_deepspeed_enabled:  # else rank 0's later from_pretrained of the parent runs under zero.Init and
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # waits on the finished ranks

        unset_hf_deepspeed_config()
    peak_memory_mb, memory_measure = measured_memory
    start_step = int(Path(resume).name.split("-")[1]) if resume else 0
    return FinetuneResult(
        model=trained, adapter=adapter, train_curve=curve, eval_loss=eval_loss,
        seconds=seconds - trainer.evaluation_seconds, eval_seconds=trainer.evaluation_seconds,
        steps=trainer.state.global_step, resumed_from=resume,
        trainable_params=sum(p.numel() for p in trained.parameters() if p.requires_grad),
        targets=list(target_names), adapter_state=adapter_state,
        is_main_process=trainer.args.should_save, steps_run=trainer.state.global_step - start_step,
        peak_memory_mb=None if peak_memory_mb is None else round(peak_memory_mb, 3), memory_measure=memory_measure,
        parallelism=parallelism(trainer),
        kl_curve=[{"step": e["step"], "kl": e["kl"]} for e in trainer.state.log_history if "kl" in e],
    )


def _gather_trainable(trainer, model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters (a collective under ZeRO-3 / FSDP2: call on every rank)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if trainer.is_deepspeed_enabled:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {name: p.detach().cpu().clone() for name, p in named}
    state = {}
    for name, parameter in named:
        tensor = parameter.detach()
        if hasattr(tensor, "full_tensor"):  # FSDP2 shards parameters as DTensors
            tensor = tensor.full_tensor()
        state[name] = tensor.cpu().clone()
    return state


def adapted_copy(base_model: nn.Module, result: FinetuneResult) -> FinetuneResult:
    """The result with its trained adapters put on `base_model`, a fresh copy of the frozen base (e.g. the
    parent checkpoint loaded on rank 0, on CPU). This is how to merge after FSDP / ZeRO-3, where result.model
    holds shards only: the base is frozen, so the parent's weights are the full weights."""
    return _with_adapters(base_model, result, assign=False)


def adapted_weightless(skeleton: nn.Module, result: FinetuneResult) -> FinetuneResult:
    """adapted_copy on a weightless copy of the base (parameters on the meta device): the trained adapters become
    real tensors in the dtype a real copy would hold them in, the frozen weights stay meta. Enough to save the
    adapter (with its targets' zero hashes given) and for a streaming merge, without the base's weights in RAM."""
    return _with_adapters(skeleton, result, assign=True)


def _with_adapters(base: nn.Module, result: FinetuneResult, *, assign: bool) -> FinetuneResult:
    """A fresh adapter of result's method injected into `base`, loaded with the trained state (assign: the loaded
    tensors replace meta parameters instead of being copied into them)."""
    adapter = type(result.adapter)(copy.deepcopy(result.adapter.config))
    model = adapter.inject(base, result.targets)
    adapter.load_trainable_state(model, result.adapter_state, assign=assign)
    return dataclasses.replace(result, model=model, adapter=adapter)


def merge_trained(result: FinetuneResult) -> nn.Module:
    """The plain model with the adapters merged (nn.Linear modules, original keys): a zero-keeping method keeps
    every zero; LoRA's merge makes the targets dense. Call on the main process only (full weights)."""
    return result.adapter.merge(result.model)


def save_trained_adapter(result: FinetuneResult, adapter_dir: str | os.PathLike, *, base_path: str,
                         base_manifest_sha256: str | None, known_zeros: dict[str, str] | None = None) -> None:
    """Write the adapter (before merging) in its method's PEFT-style layout; `known_zeros`: the zero hashes of
    targets whose weights are meta (adapted_weightless)."""
    result.adapter.save(result.model, adapter_dir, base_path=base_path, base_manifest_sha256=base_manifest_sha256,
                        known_zeros=known_zeros)

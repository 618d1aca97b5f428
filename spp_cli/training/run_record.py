"""What a fine-tune records about how it ran, beside its result: what it applied (spp.json's "applied": the data
format and template, device, compute dtype, seqlen, lr), the memory its training state took, and the data
parallelism the Trainer really ran. spp_cli/training/trainer.py gathers them into its FinetuneResult."""

from __future__ import annotations

import torch
from torch import nn


def applied_options(options, model: nn.Module, tokenizer, records: list[dict], *, device: str, precision: str,
                    lr: float) -> dict:
    """What this run resolved, for spp.json's "applied": the data format and template the records are read with
    (spp_cli/data/formats.py applied_format), the device, the dtype it computes in (autocast's, else the
    weights'), seqlen and `lr` (the method's default when options.lr is None)."""
    from spp_cli.data.formats import applied_format

    weights = next(model.parameters()).dtype
    compute = precision.removeprefix("autocast(").removesuffix(")") if precision.startswith("autocast") else weights
    return {**applied_format(records, chat_template=bool(getattr(tokenizer, "chat_template", None))),
            "device": device, "compute_dtype": str(compute).removeprefix("torch."), "seqlen": options.seqlen,
            "lr": lr}


def training_state_bytes(model: nn.Module, optimizer) -> int:
    """Bytes of the trainable parameters, their gradients and the optimizer's state tensors (activations and
    the frozen weights excluded): the part of training memory that differs between methods at equal batch."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() * p.element_size() for p in trainable)
    total += sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    for per_parameter in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in per_parameter.values() if torch.is_tensor(t))
    return total


def peak_memory(on_cuda: bool, memory: dict) -> tuple[float | None, str]:
    """(MiB, what was measured): CUDA's max allocated, else the training state's bytes measured at the first
    optimizer step (memory["bytes"]), else (None, "")."""
    if on_cuda:
        return torch.cuda.max_memory_allocated() / 2**20, "CUDA max allocated during training"
    if "bytes" not in memory:
        return None, ""
    return memory["bytes"] / 2**20, "training state (trainable params, grads, AdamW state; no activations)"


def parallelism(trainer) -> str:
    """The data parallelism the Trainer actually runs, read from accelerate's state rather than from the launch
    config: accelerate 1.16 on CPU keeps DistributedType.MULTI_CPU and drops an FSDP config, i.e. runs DDP."""
    if trainer.is_deepspeed_enabled:
        return "deepspeed"
    if trainer.is_fsdp_enabled:
        return f"fsdp{trainer.accelerator.state.fsdp_plugin.fsdp_version}"
    return "ddp" if trainer.args.world_size > 1 else "single"

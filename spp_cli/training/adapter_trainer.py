"""The Trainer spp fine-tunes with: its checkpoints hold only the trainable parameters (adapter_model.safetensors,
plus Trainer's optimizer, scheduler, RNG and state files), it resumes from the newest complete one, and it stops
every rank together on a non-finite loss. spp_cli/training/trainer.py drives it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from spp_cli.adapters.base import ADAPTER_WEIGHTS_NAME
from spp_cli.errors import BadInput

__all__ = ["CHECKPOINT_FILES", "NonFiniteLoss", "adapter_trainer_class", "last_complete_checkpoint"]


def adapter_trainer_class():
    """transformers.Trainer subclassed (imported on first use: the CLI starts without transformers)."""
    from transformers import Trainer

    class AdapterTrainer(Trainer):
        """A Trainer whose checkpoints hold only the trainable parameters, that stops on a non-finite loss and that
        times its held-out evaluations (evaluation_seconds: they are not training time)."""

        evaluation_seconds = 0.0
        objective = None  # a Distillation (spp_cli/training/distill.py); None: the model's own loss (SFT)

        def evaluate(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                self.evaluation_seconds += time.perf_counter() - start

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Trainer's cross-entropy; in training with an objective, mixed with its KL normalised as that
            cross-entropy is: per target token of the optimizer step (num_items_in_batch, scaled by the processes as
            Trainer scales the cross-entropy under DDP), else of the micro-batch (loss_normalization micro_batch).
            Held-out evaluations stay the cross-entropy, comparable across objectives."""
            if self.objective is None or not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            cross_entropy, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            per_step = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            processes = self.accelerator.num_processes if per_step and self.args.average_tokens_across_devices else 1
            loss = self.objective.loss(cross_entropy, outputs.logits, inputs,
                                       num_items_in_batch if per_step else None, processes)
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict, *args, **kwargs) -> None:
            if self.objective is not None and "loss" in logs:
                logs["kl"] = self.objective.logged_kl()  # the KL curve, beside the loss in the log history
            super().log(logs, *args, **kwargs)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            save_trainable(self, output_dir or self.args.output_dir, state_dict)

        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            if not self.is_fsdp_enabled:
                return super()._save_optimizer_and_scheduler(output_dir)
            # Trainer's FSDP branch would also gather and write the whole model, frozen base included
            # (pytorch_model_fsdp.bin): the trained tensors are in adapter_model.safetensors already
            from accelerate.utils import save_fsdp_optimizer

            save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                                output_dir)
            if self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
            from safetensors.torch import load_file

            path = os.path.join(resume_from_checkpoint, ADAPTER_WEIGHTS_NAME)
            if not os.path.isfile(path):
                raise BadInput(f"{resume_from_checkpoint} has no {ADAPTER_WEIGHTS_NAME}: remove the damaged "
                               "checkpoint (or the work directory) and rerun")
            model = self.accelerator.unwrap_model(model or self.model, keep_torch_compile=False)
            state = load_file(path)
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            if set(state) != trainable:
                raise BadInput(f"checkpoint {resume_from_checkpoint} does not match this run's adapters (different "
                               "method, targets or groups): use a new output directory or --overwrite")
            model.load_state_dict(_shard_like(model, state), strict=False)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            finite = torch.isfinite(loss.detach()).to(torch.float32)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)  # every rank stops together
            if finite.item() == 0:
                raise NonFiniteLoss(self.state.global_step + 1)
            return loss

    return AdapterTrainer


def save_trainable(trainer, output_dir: str, state_dict: dict | None) -> None:
    """A checkpoint of only the trainable parameters (adapter_model.safetensors) and the training arguments."""
    from safetensors.torch import save_file

    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if state_dict is None:  # FSDP / ZeRO-3 pass the gathered state dict, filtered here
        state_dict = model.state_dict()
    if not trainer.args.should_save:
        return
    os.makedirs(output_dir, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k in trainable}
    save_file(tensors, os.path.join(output_dir, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    torch.save(trainer.args, os.path.join(output_dir, "training_args.bin"))


def _shard_like(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (full tensors) with each tensor that is a DTensor parameter in `model` (FSDP2) cut into the same
    shards, since load_state_dict cannot copy a plain tensor into a DTensor. A collective: call on every rank."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    parameters = dict(model.named_parameters())
    sharded = {}
    for name, tensor in state.items():
        target = parameters[name]
        if isinstance(target, DTensor):
            tensor = distribute_tensor(tensor.to(target.device, target.dtype), target.device_mesh, target.placements)
        sharded[name] = tensor
    return sharded


# Trainer writes trainer_state.json last (after model, optimizer, scheduler and RNG state, whatever their layout:
# DDP's optimizer.pt, FSDP's optimizer_0/, DeepSpeed's global_step*/), so its presence marks a complete checkpoint
CHECKPOINT_FILES = (ADAPTER_WEIGHTS_NAME, "trainer_state.json")


def last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The newest checkpoint-N under `checkpoints` holding every file a resume needs (trainer_state.json is
    written last). Newer, incomplete ones (a run killed while saving) are removed by the main process."""
    import shutil

    if not checkpoints.is_dir():
        return None
    found = sorted((int(p.name.split("-")[1]), p) for p in checkpoints.glob("checkpoint-*")
                   if p.name.split("-")[1].isdigit())
    for _, path in reversed(found):
        if all((path / name).is_file() for name in CHECKPOINT_FILES):
            return str(path)
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(path, ignore_errors=True)
    return None


class NonFiniteLoss(Exception):
    def __init__(self, step: int):
        super().__init__(step)
        self.step = step

"""Distillation from a dense teacher (`spp finetune --objective distill`): the student learns the teacher's next-token
distributions on the training batches instead of (or beside) the data's tokens.

    objective = Distillation(teacher, temperature=1.0, weight=1.0)   # teacher: frozen, eval mode
    run_finetune(..., objective=objective)   # AdapterTrainer.compute_loss mixes it with the SFT loss

    loss = weight * T^2 * KL(p_teacher || q_student) + (1 - weight) * cross-entropy

KL is summed over the target positions (the tokens the cross-entropy scores: labels != -100, shifted by one as the
causal-LM loss is) and normalised like the cross-entropy of the same step (adapter_trainer.py), so weight 0 is the
SFT run and the two terms are on one scale. T^2 keeps the gradient's size independent of T (Hinton et al., 2015).
The teacher runs without gradients on the same batch, in the student's dtype and on its device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spp_cli.data.examples import IGNORE_INDEX


def next_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of KL(p_teacher || q_student) over the target positions, their number), both 0-d tensors.

    logits: [batch, seq, vocab]; labels: [batch, seq], IGNORE_INDEX where nothing is scored (prompt, padding).
    The logits at position t predict token t + 1, so position t counts when labels[t + 1] is a target. Computed
    in float32 on the target positions only ([n, vocab]); identical logits give exactly 0.
    """
    targets = labels[:, 1:] != IGNORE_INDEX  # [batch, seq - 1]
    student = student_logits[:, :-1][targets].float() / temperature  # [n, vocab]
    teacher = teacher_logits[:, :-1][targets].detach().float() / temperature
    return _SummedKL.apply(student, teacher), targets.sum()


class _SummedKL(torch.autograd.Function):
    """sum over rows of KL(softmax(teacher) || softmax(student)), with its gradient written as q - p: autograd's
    own (through log_softmax) is -p + q * sum(p), a few ulp from 0 where p = q, which AdamW's normalisation
    blows up to steps of size lr; q - p is exactly 0 there, so a model distilled into itself does not move."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_q, log_p = F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1)  # [n, vocab]
        p = log_p.exp()
        ctx.save_for_backward(log_q, p)
        return (p * (log_p - log_q)).sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        log_q, p = ctx.saved_tensors
        return grad_output * (log_q.exp() - p), None


class Distillation:
    """The distill objective the trainer is given: the frozen teacher, T and the KL's weight, and the running
    KL of the steps since the last log (the curve spp.json records beside the loss)."""

    def __init__(self, teacher: nn.Module, temperature: float = 1.0, weight: float = 1.0):
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self.weight = weight
        self._kl_sum = torch.zeros((), dtype=torch.float64)  # since the last log, this process
        self._tokens = torch.zeros((), dtype=torch.float64)

    def kl(self, student_logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """next_token_kl of the student's logits against the teacher's on the same batch (no gradient through the
        teacher); remembers the sum for the logged curve."""
        device = inputs["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)  # once: the Trainer places the student after the stage built the objective
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"],
                                          attention_mask=inputs.get("attention_mask")).logits
        kl_sum, tokens = next_token_kl(student_logits, teacher_logits, inputs["labels"], self.temperature)
        self._kl_sum += kl_sum.detach().double().cpu()
        self._tokens += tokens.double().cpu()
        return kl_sum, tokens

    def loss(self, cross_entropy: torch.Tensor, student_logits: torch.Tensor, inputs: dict[str, torch.Tensor],
             step_tokens: torch.Tensor | int | None, processes: int = 1) -> torch.Tensor:
        """The training loss of a micro-batch: its KL normalised as Trainer normalises the cross-entropy, per target
        token of the optimizer step (`step_tokens`, times the `processes` Trainer averages over under DDP), or of
        the micro-batch when `step_tokens` is None (loss_normalization micro_batch), then mixed."""
        kl_sum, tokens = self.kl(student_logits, inputs)
        kl_mean = kl_sum / step_tokens * processes if step_tokens is not None else kl_sum / tokens.clamp(min=1)
        return self.mix(cross_entropy, kl_mean)

    def mix(self, cross_entropy: torch.Tensor, kl_mean: torch.Tensor) -> torch.Tensor:
        """The training loss from the step-normalised cross-entropy and KL (both per target token)."""
        distill = self.temperature ** 2 * kl_mean
        if self.weight == 1:
            return distill  # the cross-entropy stays out of the graph (0 x a non-finite one would be NaN)
        return self.weight * distill + (1 - self.weight) * cross_entropy

    def logged_kl(self) -> float:
        """The mean KL per target token since the last call, over every process (a collective under DDP/FSDP:
        the Trainer logs on every rank); resets the running sums."""
        totals = torch.stack([self._kl_sum, self._tokens])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend_device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            totals = totals.to(backend_device)
            torch.distributed.all_reduce(totals)
        kl_sum, tokens = totals.cpu().tolist()
        self._kl_sum.zero_()
        self._tokens.zero_()
        return kl_sum / tokens if tokens else 0.0

    def parameters_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.teacher.parameters())

"""What block-wise reconstruction trains (pruners/reconstruct.py, `reconstruct_params`), one object per choice.

- "weights" (`KeptWeights`): the kept weights of the block's target linears, EBFT's choice (fp32 masters; the zeros
  get no gradient and are re-zeroed after every step).
- "spp" (`SPPUpdate`): SPP's multiplicative update of each target linear, W' = W ⊙ (1 + s·β[:, None]·Rep(α)).
- "masked-lora" (`MaskedLoRAUpdate`): a low-rank update on W's support, W' = W + s·(B A) ⊙ 1[W ≠ 0].

An adapter trains in its merged form: while the block trains, each target linear computes x W'ᵀ + b with W' the
merge formula of its parameters, cast to W's dtype (`AdaptedLinears` swaps the linears for `_AdaptedLinear`
wrappers and back). So the function trained is exactly the function of the merged block, and `merge` writes W'
into the linear's weight right after the block trains: the next block sees merged, still exactly sparse weights.

Why the math is here and not spp_cli/adapters' layers: pruners/ knows nothing of the CLI, files or recipes, and the
adapter classes there are stage-level (BadInput, the adapter registry, PEFT files, branch dropout for training).
The two merge formulas are the adapters' own (spp_cli/adapters/spp.py and masked_lora.py `merged_weight`), written
here element for element; tests/pruners/test_pruners_reconstruct.py holds them bit-identical to those. The adapters'
defaults: SPP's G = 16 groups (where 16 does not divide out_features, which the fine-tune adapter refuses,
gcd(out_features, 16) groups here) and s = lora_alpha / r = 16 / 8; masked LoRA's r = 8, s = 16 / 8; init as theirs
(α, A kaiming-uniform with a = √5, β, B zero: the block starts exactly at its pruned weights); no dropout (EBFT
trains in eval mode).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

RECONSTRUCT_PARAMS = ("weights", "spp", "masked-lora")
SPP_GROUPS = 16  # spp_cli/adapters/spp.py SPPConfig.groups
ADAPTER_RANK = 8  # SPPConfig.r (the scale only) and MaskedLoRAConfig.r
ADAPTER_SCALE = 16 / 8  # lora_alpha / r of both adapters


class Trainable(Protocol):
    """What train_block (pruners/reconstruct.py) steps: attach, then per step the gradients of `parameters`
    (fp32, what AdamW updates) unscaled, the step, after_step; merge after the last step; detach always."""

    parameters: list[torch.Tensor]

    def attach(self) -> None: ...

    def unscaled_gradients(self, scale: float) -> bool: ...

    def after_step(self) -> None: ...

    def merge(self) -> None: ...

    def detach(self) -> None: ...


class KeptWeights:
    """Fp32 master copies of the kept weights of a block's target linears; the zeros stay zeros."""

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.weights = [linear.weight for linear in linears.values()]
        self.pruned = [weight.detach().clone() for weight in self.weights]  # the weights as pruning left them
        self.keep = [weight != 0 for weight in self.weights]
        self.parameters = [weight.detach().to(torch.float32, copy=True) for weight in self.weights]  # the masters

    def attach(self) -> None:
        for weight, master in zip(self.weights, self.parameters, strict=True):
            weight.requires_grad_(True)
            master.requires_grad_(True)

    def unscaled_gradients(self, scale: float) -> bool:
        """Move each weight's gradient (kept entries only, / scale) to its master; False when one is not finite."""
        finite = True
        for weight, master, keep in zip(self.weights, self.parameters, self.keep, strict=True):
            master.grad = weight.grad.float().mul_(keep).div_(scale)
            weight.grad = None
            finite = finite and bool(torch.isfinite(master.grad).all())
        return finite

    @torch.no_grad()
    def after_step(self) -> None:
        """Masters (re-zeroed) into the block's weights, in their dtype."""
        for weight, master, keep in zip(self.weights, self.parameters, self.keep, strict=True):
            master.mul_(keep)
            weight.copy_(master)

    def merge(self) -> None:
        keep_kept_nonzero(self.weights, self.pruned)

    def detach(self) -> None:
        for weight in self.weights:
            weight.grad = None


@torch.no_grad()
def keep_kept_nonzero(weights: list[torch.Tensor], pruned: list[torch.Tensor]) -> None:
    """A kept weight (nonzero in `pruned`) that became zero in its dtype gets its pruned value back: no new zero."""
    for weight, before in zip(weights, pruned, strict=True):
        lost = (before != 0) & (weight == 0)
        weight[lost] = before[lost]


def _kaiming_uniform(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """nn.init.kaiming_uniform_(a=√5) of a (rows, columns) fp32 tensor, from `generator`: U(-1/√columns, 1/√columns)."""
    bound = 1 / math.sqrt(columns)
    return torch.rand(rows, columns, generator=generator).mul_(2 * bound).sub_(bound)


class SPPUpdate(nn.Module):
    """W ↦ W ⊙ (1 + s·β[:, None]·Rep(α)): α (G, in), β (out,), fp32; Rep repeats α's row g over out/G rows."""

    def __init__(self, weight: torch.Tensor, generator: torch.Generator) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        groups = math.gcd(out_features, SPP_GROUPS)
        self.alpha = nn.Parameter(_kaiming_uniform(groups, in_features, generator).to(weight.device))
        self.beta = nn.Parameter(torch.zeros(out_features, dtype=torch.float32, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight in W's dtype (spp_cli/adapters/spp.py merged_weight, differentiable in α and β)."""
        rows_per_group = weight.shape[-2] // self.alpha.shape[-2]
        multiplier = 1 + ADAPTER_SCALE * self.beta.float()[..., None] * self.alpha.float().repeat_interleave(
            rows_per_group, dim=-2)
        return (weight.float() * multiplier).to(weight.dtype)


class MaskedLoRAUpdate(nn.Module):
    """W ↦ W + s·(B A) ⊙ 1[W ≠ 0]: A (r, in), B (out, r), fp32; the support is W's zeros when it is built."""

    def __init__(self, weight: torch.Tensor, generator: torch.Generator) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.lora_A = nn.Parameter(_kaiming_uniform(ADAPTER_RANK, in_features, generator).to(weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, ADAPTER_RANK, dtype=torch.float32, device=weight.device))
        self.register_buffer("support", weight.detach() != 0, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight in W's dtype (spp_cli/adapters/masked_lora.py merged_weight, differentiable in A, B)."""
        delta = (self.lora_B.float() @ self.lora_A.float()).mul(self.support)
        return (weight.float() + ADAPTER_SCALE * delta).to(weight.dtype)


class _AdaptedLinear(nn.Module):
    """A target linear while its block trains: y = x W'ᵀ + b, W' = update(W) (the merged weight), W frozen."""

    def __init__(self, base: nn.Linear, update: nn.Module) -> None:
        super().__init__()
        self.base, self.update = base, update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.update(self.base.weight), self.base.bias)


class AdaptedLinears:
    """An adapter (`update_class`: SPPUpdate or MaskedLoRAUpdate) on every target linear of one block.

    attach swaps each linear for an _AdaptedLinear in the block, merge writes each merged weight into its linear,
    detach puts the linears (the very same modules) back. Parameters are initialised from `generator`, in the
    linears' order, on the linears' device.
    """

    def __init__(self, module: nn.Module, linears: dict[str, nn.Module], generator: torch.Generator,
                 update_class: type[nn.Module]) -> None:
        names = {id(child): name for name, child in module.named_modules()}
        self.module = module
        self.linears = {names[id(linear)]: linear for linear in linears.values()}  # name in the block -> linear
        self.updates = {name: update_class(linear.weight, generator) for name, linear in self.linears.items()}
        self.weights = [linear.weight for linear in self.linears.values()]
        self.pruned = [weight.detach().clone() for weight in self.weights]
        self.parameters = [parameter for update in self.updates.values() for parameter in update.parameters()]

    def attach(self) -> None:
        for name, linear in self.linears.items():
            self._put(name, _AdaptedLinear(linear, self.updates[name]))

    def unscaled_gradients(self, scale: float) -> bool:
        """Each parameter's gradient / scale, in place; False when one is not finite."""
        finite = True
        for parameter in self.parameters:
            parameter.grad.div_(scale)
            finite = finite and bool(torch.isfinite(parameter.grad).all())
        return finite

    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W' in every target linear (the zeros stay zeros); a kept weight rounded to zero keeps its value."""
        for name, linear in self.linears.items():
            linear.weight.copy_(self.updates[name](linear.weight))
        keep_kept_nonzero(self.weights, self.pruned)

    def detach(self) -> None:
        for name, linear in self.linears.items():
            self._put(name, linear)

    def _put(self, name: str, child: nn.Module) -> None:
        parent, _, attribute = name.rpartition(".")
        setattr(self.module.get_submodule(parent), attribute, child)


def trainable(params: str, module: nn.Module, linears: dict[str, nn.Module], generator: torch.Generator
              ) -> Trainable:
    """The object that trains a block for `reconstruct_params` (weights | spp | masked-lora)."""
    if params == "weights":
        return KeptWeights(linears)
    update_class = {"spp": SPPUpdate, "masked-lora": MaskedLoRAUpdate}[params]
    return AdaptedLinears(module, linears, generator, update_class)


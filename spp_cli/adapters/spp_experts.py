"""SPP on fused MoE experts: the paper's per-linear update on every expert's gate, up and down projection, with the
experts still stored fused (transformers 5: gate_up_proj (E, 2I, H) = [gate; up] per expert, down_proj (E, H, I)).

A fused parameter W (E, out, in) gets α (E, k·G, in) and β (E, out), fp32, with k = 2 for gate_up_proj (gate and up
are two linears with G groups each: Rep(α) over 2G blocks of I/G rows is SPP on gate and SPP on up) and 1 for
down_proj. With spp.py's merged weight batched over the experts,

    W' = W ⊙ (1 + s·β[..., None]·Rep(α))        zero wherever W is zero; W' = W at init (β = 0)

is a torch parametrization of the fused parameter: whatever experts implementation the config picks (the eager
loop, grouped_mm, ...) computes with W', and the gradients reach α and β; merging writes W' into the parameter
(remove_parametrizations), so the merged model is the adapted one exactly. This is SPP's "fused" forward: there is
no separate branch input to drop out, so the experts train without the branch dropout (the record says so). Each
forward builds W' once (parametrize.cached() around the experts' forward): E·out·in fp32 kept for backward.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from spp_cli.adapters.base import fully_targeted_experts
from spp_cli.errors import BadInput


class SPPExperts(nn.Module):
    """The parametrization W (E, out, in) -> W ⊙ (1 + s·β·Rep(α)); spp_alpha (E, k·G, in), spp_beta (E, out)."""

    def __init__(self, weight: torch.Tensor, linears_per_expert: int, groups: int, scale: float, name: str):
        super().__init__()
        experts, out_features, in_features = weight.shape
        linear_out = out_features // linears_per_expert
        if linear_out % groups:
            divisors = [d for d in range(groups, 0, -1) if linear_out % d == 0]
            raise BadInput(f"experts {name} have out_features {linear_out}, not divisible by --groups {groups}: "
                           f"use --groups {divisors[0]} (or another divisor of {linear_out})")
        self.scale = scale
        self.spp_alpha = nn.Parameter(torch.empty(experts, linears_per_expert * groups, in_features,
                                                  dtype=torch.float32, device=weight.device))
        self.spp_beta = nn.Parameter(torch.zeros(experts, out_features, dtype=torch.float32, device=weight.device))
        for expert in range(experts):  # as SPPLinear's α: U(-1/sqrt(in), 1/sqrt(in)) per expert (fan_in = in)
            nn.init.kaiming_uniform_(self.spp_alpha.data[expert], a=math.sqrt(5))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        from spp_cli.adapters.spp import merged_weight  # (spp.py imports this module)

        return merged_weight(weight, self.spp_alpha, self.spp_beta, self.scale)


def _cached_forward(module: nn.Module):
    """The experts' own forward, with W' built once per call instead of once per expert index."""
    forward = type(module).forward

    def cached(*args, **kwargs):
        with parametrize.cached():
            return forward(module, *args, **kwargs)

    return cached


def inject_spp_experts(model: nn.Module, expert_slices: list[str], groups: int, scale: float) -> list[str]:
    """Parametrize every fused parameter whose expert slices are all in `expert_slices`; the others stay frozen.
    Returns the slice names adapted (adapters/base.split_fused_experts names)."""
    adapted = []
    for (owner, parameter), slices in fully_targeted_experts(model, expert_slices).items():
        experts = model.get_submodule(owner)
        weight = getattr(experts, parameter)
        weight.requires_grad_(False)
        linears = 1 if parameter == "down_proj" else 2
        parametrize.register_parametrization(experts, parameter,
                                             SPPExperts(weight, linears, groups, scale, f"{owner}.{parameter}"))
        if "forward" not in experts.__dict__:
            experts.forward = _cached_forward(experts)
        adapted.extend(slices)
    return adapted


def spp_expert_parametrizations(model: nn.Module) -> dict[str, SPPExperts]:
    """{"<experts module>.<parameter>": SPPExperts} for every injected fused parameter, in module order."""
    found = {}
    for name, module in model.named_modules():
        for parameter, chain in getattr(module, "parametrizations", {}).items():
            for parametrization in chain:
                if isinstance(parametrization, SPPExperts):
                    found[f"{name}.{parameter}"] = parametrization
    return found


def expert_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<experts>.<parameter>.spp_alpha": (E, k·G, in), "...spp_beta": (E, out)}, contiguous CPU copies."""
    state = {}
    for name, parametrization in spp_expert_parametrizations(model).items():
        state[f"{name}.spp_alpha"] = parametrization.spp_alpha.detach().cpu().contiguous().clone()
        state[f"{name}.spp_beta"] = parametrization.spp_beta.detach().cpu().contiguous().clone()
    return state


@torch.no_grad()
def load_expert_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    for name, parametrization in spp_expert_parametrizations(model).items():
        for key, parameter in ((f"{name}.spp_alpha", parametrization.spp_alpha),
                               (f"{name}.spp_beta", parametrization.spp_beta)):
            if key not in state or state[key].shape != parameter.shape:
                raise BadInput(f"{source}: {key} is missing or has the wrong shape: the adapter is damaged")
            parameter.copy_(state[key])


def merge_spp_experts(model: nn.Module) -> None:
    """Write W' into every parametrized fused parameter; the plain experts modules (and state-dict keys) again."""
    for name in spp_expert_parametrizations(model):
        owner, parameter = name.rsplit(".", 1)
        experts = model.get_submodule(owner)
        parametrize.remove_parametrizations(experts, parameter, leave_parametrized=True)
        experts.__dict__.pop("forward", None)
        getattr(experts, parameter).requires_grad_(False)

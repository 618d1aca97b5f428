"""The SPP adapter: a sparsity-preserving, parameter-efficient update of a frozen pruned linear layer.

Spec: ../shared/spec/spp-method.md §1. For a frozen pruned weight W (out × in, zeros = pruned):

    M  = β[:, None] · Rep(α)           # (out, in); Rep repeats row g of α (G, in) for out/G contiguous rows
    ΔW = W ⊙ M                         # zero wherever W is zero
    y  = x Wᵀ + b + s · D(x) ΔWᵀ        # s = lora_alpha / r (16 / 8 = 2), D = dropout (p = 0.05)

α is kaiming-uniform (a=√5), β is zero, so the adapted model starts exactly at the pruned one. Merging writes
W ← W ⊙ (1 + s·M), so every zero of W stays zero.

Forward variants (`SPPConfig.forward`), all the same function of the parameters:
- "naive":     builds M and ΔW in the autograd graph (the reference; keeps out×in tensors for backward).
- "recompute": one custom autograd function for the whole layer; ΔW is rebuilt in backward instead of kept
               (2 GEMMs forward, 3 backward; nothing out×in is saved). The faithful default.
- "fused":     y = x (W ⊙ (1 + s·M))ᵀ + b in one GEMM (1 forward, 2 backward); exact only without dropout on
               the branch, so it requires dropout 0.
- "auto":      "fused" when dropout is 0, else "recompute".
A per-group form (spec §1.2: concat_g[(x ⊙ α_g) W_gᵀ] ⊙ β, with a per-group backward) was measured too: 3-10×
slower than "recompute" on CPU (G small GEMMs plus G·B·in elementwise passes), so it is not offered.

`SPPAdapter` (the end of this file) is the method behind the adapter interface (adapters/base.py), which saves and
loads it like every other method (PEFT's layout: adapter_config.json + adapter_model.safetensors); its default
learning rate, 4e-3, is the paper code's (spec §2). Fused MoE experts: adapters/spp_experts.py.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spp_cli.adapters.base import (
    ADAPTER_CONFIG_NAME,
    Adapter,
    WrappedLinear,
    layers_by_suffix,
    read_adapter_config,
    resolve_targets,
    set_submodule,
    split_fused_experts,
)
from spp_cli.adapters.spp_experts import inject_spp_experts, merge_spp_experts, spp_expert_parametrizations
from spp_cli.errors import BadInput
from spp_cli.vocabulary import SPP_FORWARDS

FORWARD_VARIANTS = SPP_FORWARDS
FAITHFUL_DEFAULT = "recompute"  # fastest exact variant with dropout on CPU fp32 (see scripts/bench_finetune.py)


@dataclass
class SPPConfig:
    """Hyper-parameters of the SPP adapter (spec §1; defaults are the paper code's)."""

    groups: int = 16  # G: rows of α; α row g is shared by out/G contiguous output rows
    lora_alpha: float = 16  # only sets the scale s = lora_alpha / r
    r: int = 8  # LoRA's rank knob, kept for the scale only (SPP has no rank)
    dropout: float = 0.05  # dropout on the branch input
    target_modules: list[str] = field(default_factory=list)
    forward: str = "auto"

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r

    def resolved_forward(self) -> str:
        """The variant actually run: "auto" becomes "fused" without dropout, else FAITHFUL_DEFAULT."""
        if self.forward not in FORWARD_VARIANTS:
            raise BadInput(f"--forward {self.forward!r} is unknown: use one of {', '.join(FORWARD_VARIANTS)}")
        if self.forward == "fused" and self.dropout > 0:
            raise BadInput(
                f"--forward fused needs --dropout 0 (it merges the branch into one GEMM, which cannot apply "
                f"dropout {self.dropout} to the branch input): pass --dropout 0 or drop --forward fused"
            )
        if self.forward == "auto":
            return "fused" if self.dropout == 0 else FAITHFUL_DEFAULT
        return self.forward

    def validate(self) -> None:
        if self.groups < 1:
            raise BadInput(f"--groups {self.groups} is invalid: use a positive integer (default 16)")
        if not 0 <= self.dropout < 1:
            raise BadInput(f"--dropout {self.dropout} is out of range: use a value in [0, 1)")
        if self.r <= 0:
            raise BadInput(f"r {self.r} is invalid: use a positive integer (default 8)")
        self.resolved_forward()


# ---- the math: pure functions (tensors in, tensors out) ----


def repeat_groups(alpha: torch.Tensor, out_features: int) -> torch.Tensor:
    """Rep(α): (G, in) -> (out, in), row g repeated out/G times in a contiguous block (repeat_interleave)."""
    return alpha.repeat_interleave(out_features // alpha.shape[0], dim=0)


def scaled_by_groups(weight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """W ⊙ Rep(α) in fp32 without materialising Rep(α): (out, in)."""
    groups = alpha.shape[0]
    out_features, in_features = weight.shape
    blocks = weight.float().view(groups, out_features // groups, in_features)
    return (blocks * alpha.float()[:, None, :]).view(out_features, in_features)


def delta_weight(weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ΔW = W ⊙ β[:, None] ⊙ Rep(α), fp32, (out, in)."""
    return scaled_by_groups(weight, alpha) * beta.float()[:, None]


def merged_weight(weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, scale: float) -> torch.Tensor:
    """W ⊙ (1 + s·β·Rep(α)) computed in fp32 and cast back to W's dtype; every zero of W stays zero.

    W (..., out, in), α (..., G, in), β (..., out): a linear, or fused experts batched over their first dimension
    (spp_experts.py, whose expert slices this computes element for element). SPP's one merge formula: the layers'
    merge, the experts' parametrization and the streaming merge (stages/merge_streaming.py) all call it."""
    rows_per_group = weight.shape[-2] // alpha.shape[-2]
    multiplier = 1 + scale * beta.float()[..., None] * alpha.float().repeat_interleave(rows_per_group, dim=-2)
    return (weight.float() * multiplier).to(weight.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on for x's device, else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _alpha_beta_grads(grad_delta: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor,
                      beta: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of α (G, in) and β (out,) from P = ∂L/∂ΔW' (out, in), where the layer uses s·ΔW' = s·W⊙β⊙Rep(α).

    ∂α_g = s Σ_{i∈g} P_ij W_ij β_i ;  ∂β_i = s Σ_j P_ij W_ij Rep(α)_ij     (overwrites grad_delta)
    """
    groups = alpha.shape[0]
    out_features, in_features = weight.shape
    pw = grad_delta.float().mul_(weight).view(groups, out_features // groups, in_features)  # (G, out/G, in)
    grad_alpha = torch.bmm(pw.transpose(1, 2), beta.float().view(groups, -1, 1)).squeeze(-1) * scale
    grad_beta = torch.bmm(pw, alpha.float().unsqueeze(-1)).reshape(out_features) * scale
    return grad_alpha.to(alpha.dtype), grad_beta.to(beta.dtype)


class _SPPLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s · xd ΔWᵀ, ΔW = W ⊙ β ⊙ Rep(α), with ΔW rebuilt in backward instead of kept.

    xd is the dropped-out branch input (x itself without dropout). Saved for backward: xd and the parameters,
    never an out×in tensor. forward: 2 GEMMs; backward: ∂x = g W, ∂xd = s·g ΔW, P = gᵀ xd (3 GEMMs), then
    P is reduced against W for ∂α, ∂β.
    """

    @staticmethod
    def forward(ctx, x, xd, weight, bias, alpha, beta, scale):
        dtype = _compute_dtype(x)
        delta = scaled_by_groups(weight, alpha).mul_(beta.float()[:, None]).to(dtype)  # ΔW, freed on return
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        out = F.linear(x2, weight.to(dtype), None if bias is None else bias.to(dtype))
        out.addmm_(xd.reshape(-1, xd.shape[-1]).to(dtype), delta.t(), alpha=scale)
        ctx.save_for_backward(xd, weight, alpha, beta)
        ctx.scale, ctx.dtype, ctx.x_dtype = scale, dtype, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xd, weight, alpha, beta = ctx.saved_tensors
        scale, dtype = ctx.scale, ctx.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (B, out)
        grad_x = grad_xd = grad_alpha = grad_beta = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.to(dtype)).view(*grad_out.shape[:-1], -1).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            delta = scaled_by_groups(weight, alpha).mul_(beta.float()[:, None] * scale).to(dtype)
            grad_xd = (g @ delta).view_as(xd).to(xd.dtype)
            del delta
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            p = g.t() @ xd.reshape(-1, xd.shape[-1]).to(dtype)  # (out, in) = ∂L/∂ΔW / s
            grad_alpha, grad_beta = _alpha_beta_grads(p, weight, alpha, beta, scale)
        return grad_x, grad_xd, None, None, grad_alpha, grad_beta, None


def _merged_for_matmul(weight, alpha, beta, scale, dtype):
    """W + s·ΔW in `dtype` with a single out×in fp32 temp (no grad tracking: autograd.Function internals)."""
    return scaled_by_groups(weight, alpha).mul_(beta.float()[:, None] * scale).add_(weight.float()).to(dtype)


class _FusedLinear(torch.autograd.Function):
    """x (W ⊙ (1 + s·M))ᵀ + b in one GEMM; the merged weight is rebuilt in backward, never kept."""

    @staticmethod
    def forward(ctx, x, weight, bias, alpha, beta, scale):
        dtype = _compute_dtype(x)
        merged = _merged_for_matmul(weight, alpha, beta, scale, dtype)
        ctx.save_for_backward(x, weight, alpha, beta)
        ctx.scale, ctx.dtype = scale, dtype
        return F.linear(x.to(dtype), merged, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, alpha, beta = ctx.saved_tensors
        scale, dtype = ctx.scale, ctx.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            merged = _merged_for_matmul(weight, alpha, beta, scale, dtype)
            grad_x = (grad_out.to(dtype) @ merged).to(x.dtype)
            del merged
        grad_alpha = grad_beta = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            p = g.t() @ x.reshape(-1, x.shape[-1]).to(dtype)  # (out, in) = ∂L/∂W_merged
            grad_alpha, grad_beta = _alpha_beta_grads(p, weight, alpha, beta, scale)
        return grad_x, None, None, grad_alpha, grad_beta, None


# ---- the layer ----


class SPPLinear(WrappedLinear):
    """A frozen (pruned) nn.Linear plus the SPP branch: spp_alpha (G, in), spp_beta (out,), both fp32.

    The base module is kept as `self.base` (its weight is never modified until `merge`).
    """

    def __init__(self, base: nn.Linear, config: SPPConfig, name: str = "linear"):
        super().__init__()
        out_features, in_features = base.weight.shape
        if out_features % config.groups != 0:
            divisors = [d for d in range(config.groups, 0, -1) if out_features % d == 0]
            raise BadInput(
                f"layer {name} has out_features {out_features}, not divisible by --groups {config.groups}: "
                f"use --groups {divisors[0]} (or another divisor of {out_features})"
            )
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.scale = config.scale
        self.dropout_p = config.dropout
        self.variant = config.resolved_forward()
        device = base.weight.device
        self.spp_alpha = nn.Parameter(torch.empty(config.groups, in_features, dtype=torch.float32, device=device))
        self.spp_beta = nn.Parameter(torch.zeros(out_features, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.spp_alpha, a=math.sqrt(5))  # U(-1/sqrt(in), 1/sqrt(in))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base.weight, self.base.bias
        if self.variant == "fused":
            return _FusedLinear.apply(x, weight, bias, self.spp_alpha, self.spp_beta, self.scale)
        xd = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        if self.variant == "recompute":
            return _SPPLinearFunction.apply(x, xd, weight, bias, self.spp_alpha, self.spp_beta, self.scale)
        # "naive", the reference: ΔW is built in the autograd graph (and kept for backward)
        result = F.linear(x, weight, bias)
        delta = delta_weight(weight, self.spp_alpha, self.spp_beta).to(_compute_dtype(x))
        return result + (F.linear(xd.to(delta.dtype), delta) * self.scale).to(result.dtype)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """The base nn.Linear with W ← W ⊙ (1 + s·β·Rep(α)) written into it (fp32 math, W's dtype)."""
        self.base.weight.copy_(merged_weight(self.base.weight, self.spp_alpha, self.spp_beta, self.scale))
        return self.base

    def extra_repr(self) -> str:
        groups, in_features = self.spp_alpha.shape
        return (f"in={in_features}, out={self.spp_beta.shape[0]}, groups={groups}, scale={self.scale}, "
                f"dropout={self.dropout_p}, forward={self.variant}")


# ---- model surgery ----


def inject_spp(model: nn.Module, target_names: list[str], config: SPPConfig) -> dict[str, SPPLinear]:
    """Replace the named nn.Linear modules by SPPLinear, in place; freeze every non-`spp_` parameter.

    `target_names` are full module names (or PEFT-style suffixes such as "q_proj"). Layers already wrapped
    are kept as they are. Returns {full module name: SPPLinear}. Raises BadInput on a layer whose
    out_features is not divisible by config.groups.
    """
    config.validate()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layers: dict[str, SPPLinear] = {}
    for name in resolve_targets(model, target_names, (nn.Linear, SPPLinear)):
        module = model.get_submodule(name)
        if not isinstance(module, SPPLinear):
            module = SPPLinear(module, config, name=name)
            set_submodule(model, name, module)
        layers[name] = module
    for layer in layers.values():
        layer.spp_alpha.requires_grad_(True)
        layer.spp_beta.requires_grad_(True)
    config.target_modules = list(layers)
    return layers


def spp_layers(model: nn.Module) -> dict[str, SPPLinear]:
    """{full module name: SPPLinear} for every injected layer, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SPPLinear)}


def merge_spp(model: nn.Module) -> None:
    """Merge every SPP layer into its base weight in place and put the plain nn.Linear back.

    Afterwards the model has its original module tree, so `save_pretrained` writes the original key names.
    Under FSDP / ZeRO-3, call this on rank 0 on the full gathered (unwrapped) model, never on shards.
    """
    for name, layer in spp_layers(model).items():
        set_submodule(model, name, layer.merged_linear())


# the experts' W' is one parametrization (spp_experts.py): SPP's "fused" form, without the branch dropout
EXPERTS_FORWARD = "fused, no branch dropout"
# an expert parametrization's parameter "<experts>.parametrizations.<fused>.0.spp_alpha" is stored as
# "<experts>.<fused>.spp_alpha" in adapter_model.safetensors
_EXPERT_PARAMETER = re.compile(r"\.parametrizations\.(\w+)\.0\.(spp_alpha|spp_beta)$")


class SPPAdapter(Adapter):
    """SPP behind the adapter interface: Lu et al., ICML 2024 (arXiv 2405.16057), github.com/Lucky-Lance/SPP.

    Defaults are the paper code's (spec/spp-method.md §1-2): G = 16 groups, s = lora_alpha / lora_r = 16 / 8,
    dropout 0.05, AdamW lr 4e-3. Keeps every zero: the merge is W ⊙ (1 + s·M). Files: the base's save/load, with
    the scale (and the experts' forward) in adapter_config.json and the experts' α/β stored per fused parameter.
    """

    name = "spp"
    adapts_fused_experts = True  # adapters/spp_experts.py

    @classmethod
    def make_config(cls, options: dict) -> SPPConfig:
        return SPPConfig(groups=options["groups"], lora_alpha=options["lora_alpha"], r=options["lora_r"],
                         dropout=options["dropout"], forward=options["forward"])

    @classmethod
    def config_class(cls) -> type:
        return SPPConfig

    def validate(self) -> None:
        self.config.validate()

    def inject(self, model: nn.Module, targets: list[str]) -> nn.Module:
        linears, expert_slices = split_fused_experts(model, targets)
        inject_spp(model, linears, self.config)
        adapted = inject_spp_experts(model, expert_slices, self.config.groups, self.config.scale)
        self.config.target_modules = self.config.target_modules + adapted
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        merge_spp(model)
        merge_spp_experts(model)
        return model

    def file_record(self, model: nn.Module) -> dict:
        """The config, with the scale it implies beside the groups (the key order SPP's files always had)."""
        record = self.record()
        record = {"groups": record.pop("groups"), "scale": self.config.scale, **record}
        if spp_expert_parametrizations(model):
            record["experts_forward"] = EXPERTS_FORWARD
        return record

    def file_key(self, parameter_name: str) -> str:
        return _EXPERT_PARAMETER.sub(r".\1.\2", parameter_name)

    def file_layers(self, keys: list[str]) -> dict[str, dict[str, str]]:
        """`<layer>.spp_alpha` / `.spp_beta`: a linear's, or a fused experts parameter's (`<experts>.gate_up_proj`)."""
        return layers_by_suffix(keys, {".spp_alpha": "alpha", ".spp_beta": "beta"})

    def merged_layer(self, layer: str, weight: torch.Tensor, bias: torch.Tensor | None,
                     tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return merged_weight(weight, tensors["alpha"], tensors["beta"], self.config.scale), bias

    def fits(self, layer: str, weight: tuple[int, ...], shapes: dict[str, tuple[int, ...]]) -> bool:
        """W (..., out, in), α (..., G, in) with G dividing out, β (..., out) (merged_weight)."""
        alpha, beta = shapes.get("alpha"), shapes.get("beta")
        if alpha is None or beta is None or len(weight) < 2 or len(alpha) != len(weight):
            return False
        return (alpha[:-2] == weight[:-2] and alpha[-1] == weight[-1] and alpha[-2] > 0
                and weight[-2] % alpha[-2] == 0 and beta == weight[:-1])


def load_spp_adapter(model: nn.Module, adapter_dir: str | os.PathLike, *,
                     base_manifest_sha256: str | None = None) -> SPPConfig:
    """Inject SPP layers into `model` (in place) and load a saved SPP adapter; returns its SPPConfig.

    Refuses (BadInput), before the model is modified, a directory that is not an SPP adapter, a base whose manifest
    sha differs from the one the adapter was trained on (when both are known) or whose target zero masks differ.
    """
    record = read_adapter_config(adapter_dir)
    if record.get("peft_type") != "SPP":
        raise BadInput(f"{Path(adapter_dir) / ADAPTER_CONFIG_NAME}: peft_type is {record.get('peft_type')!r}, "
                       "not 'SPP': this is not an SPP adapter")
    recorded = record.get("base_manifest_sha256")
    if base_manifest_sha256 and recorded and base_manifest_sha256 != recorded:
        raise BadInput(f"adapter {adapter_dir} was trained on base manifest {recorded[:12]}..., this base is "
                       f"{base_manifest_sha256[:12]}...: load it onto {record.get('base_model_name_or_path')}")
    adapter, _ = SPPAdapter.load(model, adapter_dir)
    return adapter.config

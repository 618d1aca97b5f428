"""Mixture-of-experts blocks for the sequential driver: every expert pruned with the tokens routed to it.

transformers 5 stores a block's experts fused (MixtralExperts, Qwen3MoeExperts, ...: `use_experts_implementation`):
gate_up_proj (experts, 2*intermediate, hidden) with [gate; up] concatenated, down_proj (experts, hidden,
intermediate), both (out, in) per expert, and a forward that picks an implementation from the config. Here:
- each expert's gate, up and down projections are `ExpertLinear`s: nn.Linear-like modules whose `weight` is a view
  of the fused parameter (in-place pruning writes through), named `<experts>.<e>.gate_proj|up_proj|down_proj` as in
  the pre-fusion checkpoints;
- `use_eager_experts` replaces each fused module's forward, while pruning, by the reference eager loop calling those
  modules on the tokens routed to each expert, so forward hooks observe exactly those tokens (gate and up see the
  very same tensor, so they share statistics, as q/k/v do);
- routers (the `gate`/`router` of a module that has `experts`, an nn.Linear or a TopKRouter's weight) are pruned
  only when `targets` is given and matches their name;
- `ExpertPruner` counts the tokens an expert saw and falls back to magnitude below `min_tokens` (LayerReport's
  `fallback` and `tokens` record it);
- `ExpertFallback`, a driver hook (pruners/hooks.py), does all of this while the driver runs.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pruners.errors import UnsupportedModelError
from pruners.hooks import BlockContext, PruneHook, PruneRun
from pruners.magnitude import MagnitudePruner
from pruners.masks import SparsityPattern
from pruners.reports import LayerReport

DEFAULT_MIN_TOKENS = 16
ROUTER_NAMES = frozenset({"gate", "router"})
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_SLICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # fused module -> {(expert, projection): slice}


class ExpertLinear(nn.Module):
    """One expert's projection, rows of a fused 3-D parameter, seen as a bias-free nn.Linear (weight (out, in))."""

    routed = True  # its input is the tokens routed to it from every window of a forward at once (the driver runs
    # such blocks one window a forward, so statistics keep the references' per-window order)

    def __init__(self, experts: nn.Module, parameter: str, expert: int, rows: slice) -> None:
        super().__init__()
        object.__setattr__(self, "experts", experts)  # a reference, not a submodule
        self.parameter, self.expert, self.rows = parameter, expert, rows

    @property
    def weight(self) -> torch.Tensor:
        """A view (out, in) of the fused parameter as it is now (after any .to(device)). Under an adapter's
        parametrization (spp_cli/adapters/spp_experts.py) the stored, frozen weight, as a wrapped linear's
        `weight` is its base's."""
        parametrizations = getattr(self.experts, "parametrizations", None)
        if parametrizations is not None and self.parameter in parametrizations:
            return parametrizations[self.parameter].original[self.expert, self.rows]
        return getattr(self.experts, self.parameter)[self.expert, self.rows]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RouterLinear(nn.Module):
    """A router whose weight (experts, hidden) is a plain parameter; hooks go on the router itself."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "router", router)

    @property
    def weight(self) -> torch.Tensor:
        return self.router.weight

    @property
    def in_features(self) -> int:
        return self.router.weight.shape[1]

    def register_forward_hook(self, hook, **kwargs):  # the router's input is the linear's input
        return self.router.register_forward_hook(hook, **kwargs)

    def register_forward_pre_hook(self, hook, **kwargs):
        return self.router.register_forward_pre_hook(hook, **kwargs)


def is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3


def _slices(experts: nn.Module, name: str) -> dict[tuple[int, str], ExpertLinear]:
    if experts not in _SLICES:
        unsupported = [flag for flag in ("is_transposed", "has_bias") if getattr(experts, flag, False)]
        if unsupported or not getattr(experts, "is_concatenated", True) or not getattr(experts, "has_gate", True):
            raise UnsupportedModelError(f"{name}: fused experts with {', '.join(unsupported) or 'this layout'} are "
                                        "not supported; prune the other linears with --ignore experts")
        count, double, _ = experts.gate_up_proj.shape
        half = double // 2
        _SLICES[experts] = {
            **{(e, "gate_proj"): ExpertLinear(experts, "gate_up_proj", e, slice(0, half)) for e in range(count)},
            **{(e, "up_proj"): ExpertLinear(experts, "gate_up_proj", e, slice(half, double)) for e in range(count)},
            **{(e, "down_proj"): ExpertLinear(experts, "down_proj", e, slice(None)) for e in range(count)},
        }
    return _SLICES[experts]


def is_router(name: str, parent: nn.Module | None) -> bool:
    """A router: named gate/router inside a module that has `experts`."""
    return parent is not None and hasattr(parent, "experts") and name.rsplit(".", 1)[-1] in ROUTER_NAMES


def block_expert_linears(block: nn.Module, block_name: str, keep: re.Pattern | None, drop: re.Pattern | None
                         ) -> dict[str, nn.Module]:
    """Full name -> ExpertLinear for every expert projection in `block`, plus routers whose name `keep` matches."""
    found = {}
    modules = dict(block.named_modules())
    for sub_name, module in modules.items():
        name = f"{block_name}.{sub_name}"
        parent = modules.get(sub_name.rsplit(".", 1)[0] if "." in sub_name else "")
        if is_fused_experts(module):
            slices = _slices(module, name)
            for expert in range(module.gate_up_proj.shape[0]):
                for projection in _PROJECTIONS:
                    full = f"{name}.{expert}.{projection}"
                    if (keep is None or keep.search(full)) and (drop is None or not drop.search(full)):
                        found[full] = slices[(expert, projection)]
        elif (is_router(name, parent) and not isinstance(module, nn.Linear)
              and isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.dim() == 2
              and keep is not None and keep.search(name) and (drop is None or not drop.search(name))):
            found[name] = RouterLinear(module)
    return found


def weight_of(model: nn.Module, name: str) -> torch.Tensor:
    """The weight (out, in) of a prunable linear by its full name: a module's, or an expert slice of a fused one."""
    try:
        return model.get_submodule(name).weight  # a path walk, not a scan of every module (MoE: thousands)
    except AttributeError:
        owner, expert, projection = name.rsplit(".", 2)
        return _slices(model.get_submodule(owner), owner)[(int(expert), projection)].weight


def _routed_forward(experts: nn.Module, slices: dict[tuple[int, str], ExpertLinear]):
    """The eager loop of MixtralExperts.forward (transformers 5.24), through the ExpertLinear modules."""
    count = experts.gate_up_proj.shape[0]

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)  # (tokens, hidden)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=count + 1).permute(2, 1, 0)  # (experts+1, k, tokens)
            hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit[:, 0].tolist():
            if expert == count:
                continue
            top_k_position, token_index = torch.where(expert_mask[expert])
            state = hidden_states[token_index]  # (routed tokens, hidden): one tensor for gate and up
            hidden = experts.act_fn(slices[(expert, "gate_proj")](state)) * slices[(expert, "up_proj")](state)
            out = slices[(expert, "down_proj")](hidden) * top_k_weights[token_index, top_k_position, None]
            final.index_add_(0, token_index, out.to(final.dtype))
        return final

    return forward


def use_eager_experts(blocks: nn.ModuleList) -> list[tuple[nn.Module, object]]:
    """Make every fused experts module in `blocks` run the eager loop through its ExpertLinear slices; return what
    `restore_experts` needs to undo it."""
    patched = []
    try:
        for name, module in blocks.named_modules():
            if is_fused_experts(module):
                patched.append((module, module.__dict__.get("forward")))
                module.forward = _routed_forward(module, _slices(module, name))
    except BaseException:
        restore_experts(patched)
        raise
    return patched


def restore_experts(patched: list[tuple[nn.Module, object]]) -> None:
    """Give each module `use_eager_experts` patched its own forward back."""
    for module, forward in patched:
        if forward is None:
            del module.forward
        else:
            module.forward = forward


class ExpertPruner:
    """Wraps an expert projection's pruner: counts routed tokens; below `min_tokens` prunes by magnitude instead."""

    needs_calibration = True

    def __init__(self, inner, layer: ExpertLinear, name: str, min_tokens: int = DEFAULT_MIN_TOKENS) -> None:
        self.inner, self.layer, self.name, self.min_tokens = inner, layer, name, min_tokens
        self.tokens = [0]  # shared with linears fed the same routed tensor

    def add_batch(self, inp: torch.Tensor) -> None:
        self.tokens[0] += inp.reshape(-1, inp.shape[-1]).shape[0]
        self.inner.add_batch(inp)

    def share_statistics(self, other: ExpertPruner) -> None:
        self.inner.share_statistics(other.inner)
        self.tokens = other.tokens

    def prune(self, pattern: SparsityPattern) -> LayerReport:
        if self.tokens[0] < max(self.min_tokens, 1):
            report = MagnitudePruner(self.layer, self.name).prune(pattern)
            report.fallback = "magnitude"
        else:
            report = self.inner.prune(pattern)
        report.tokens = self.tokens[0]
        return report


class ExpertFallback(PruneHook):
    """MoE experts in the driver: eager experts for the whole run, an ExpertPruner around each expert projection's
    pruner (when the method observes inputs), and experts no token was routed to pruned by the fallback right after
    the block's statistics (their reports come after the block's other linears')."""

    def __init__(self, min_tokens: int = DEFAULT_MIN_TOKENS) -> None:
        self.min_tokens = min_tokens
        self.patched: list = []

    def start(self, run: PruneRun) -> None:
        self.patched = use_eager_experts(run.blocks)

    def finish(self, run: PruneRun) -> None:
        restore_experts(self.patched)

    def make_pruner(self, name: str, linear: nn.Module, inner: Callable[[], object]) -> object:
        pruner = inner()
        if isinstance(linear, ExpertLinear) and pruner.needs_calibration:
            return ExpertPruner(pruner, linear, name, self.min_tokens)
        return pruner

    def after_statistics(self, block: BlockContext) -> None:
        unrouted = [name for name in block.unobserved if isinstance(block.linears[name], ExpertLinear)]
        block.reports += [block.make_pruner(name).prune(block.pattern) for name in unrouted]  # 0 tokens: fallback
        block.unobserved = [name for name in block.unobserved if name not in unrouted]

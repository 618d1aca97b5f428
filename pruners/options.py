"""What prune_model is asked to do: `PruneOptions`, its checks, and the hooks (pruners/hooks.py) it needs.

The CLI, recipes and `spp_cli.prune` check the same rules before any weights load (spp_cli/recipe/schema.py,
PruneStage.check); `check()` is for direct Python callers of prune_model, and tests/stages/test_prune_stage.py
holds both to the same answers. true_sequential is SparseGPT's option only, as in the references: SparseGPT's
llama.py has --true-sequential, Wanda's main.py collects every sub-layer's statistics from one dense pass.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch
from torch import nn

from pruners import PRUNERS
from pruners.dsnot import DSnoTRefinement
from pruners.errors import PrunerOptionError
from pruners.experts import DEFAULT_MIN_TOKENS, ExpertFallback
from pruners.hooks import PruneHook, ReconstructionError
from pruners.masks import SparsityPattern
from pruners.owl import DEFAULT_LAMBDA, DEFAULT_THRESHOLD, OwlSparsity, check_owl_options
from pruners.reconstruct import BlockReconstruction, ReconstructSettings

REFINES = ("none", "dsnot", "reconstruct", "dsnot+reconstruct")  # what may follow the method's masks, in order
DEFAULTS = ReconstructSettings()


@dataclass
class PruneOptions:
    method: str  # magnitude | wanda | sparsegpt (pruners.PRUNERS)
    pattern: SparsityPattern  # the sparsity, unstructured or N:M
    _: KW_ONLY
    targets: str | None = None  # regex: prune only the linears whose full name matches (re.search)
    ignore: str | None = None  # regex: skip the linears whose full name matches
    device: str | torch.device = "cpu"  # where each block is computed; the model stays where it is. Calibration
    # activations stay on `device` when it is a GPU with room for them, otherwise on CPU
    batch_size: int = 1  # calibration samples per forward (1 reproduces the references' statistics order)
    use_variant: bool = False  # wanda: the cumulative-score variant (pruners/wanda.py)
    true_sequential: bool = False  # sparsegpt: statistics again after each group of linears fed the same input
    sparsity_profile: str = "uniform"  # uniform: every block at pattern.sparsity; owl: per-block sparsity from the
    # block's outlier ratio (pruners/owl.py; unstructured only; needs calibration data)
    owl_threshold: float = DEFAULT_THRESHOLD  # OWL's M
    owl_lambda: float = DEFAULT_LAMBDA  # OWL's lambda: the block sparsities spread over 2 x lambda
    refine: str = "none"  # dsnot: the wanda or sparsegpt mask refined by prune-and-grow per row (pruners/dsnot.py);
    # reconstruct: each block's kept weights trained to reproduce its dense outputs (pruners/reconstruct.py);
    # dsnot+reconstruct: both, in that order
    reconstruct_epochs: int = DEFAULTS.epochs  # the reconstruct_* options: pruners/reconstruct.py (EBFT's defaults)
    reconstruct_lr: float = DEFAULTS.lr
    reconstruct_batch_size: int = DEFAULTS.batch_size
    reconstruct_weight_decay: float = DEFAULTS.weight_decay
    reconstruct_warmup_steps: int = DEFAULTS.warmup_steps
    reconstruct_params: str = "weights"  # what trains: the kept weights, or an spp or masked-lora adapter merged
    # right after its block trains (pruners/reconstruct_params.py)
    seed: int = 0  # reconstruct: with the block index, seeds the order of the training windows
    min_expert_tokens: int = DEFAULT_MIN_TOKENS  # a fused-MoE expert projection that saw fewer calibration tokens
    # is pruned by magnitude instead (pruners/experts.py; its LayerReport says so in `fallback` and `tokens`)

    def check(self) -> None:
        """Raise PrunerOptionError for options that cannot work together (the model is not looked at)."""
        if self.method not in PRUNERS:
            raise PrunerOptionError(f"unknown pruning method {self.method!r}: use one of {', '.join(PRUNERS)}")
        if self.use_variant and self.method != "wanda":
            raise PrunerOptionError(f"use_variant is a wanda option; {self.method} has no variant")
        if self.true_sequential and self.method != "sparsegpt":
            raise PrunerOptionError(f"true_sequential is a sparsegpt option; {self.method} collects every "
                                    "linear's statistics from one dense pass")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PrunerOptionError(f"batch_size {self.batch_size!r} is invalid: use an integer >= 1")
        if self.refine not in REFINES:
            raise PrunerOptionError(f"unknown refine {self.refine!r}: use one of {', '.join(REFINES)}")
        if self.dsnot and self.method not in ("wanda", "sparsegpt"):
            raise PrunerOptionError(f"refine dsnot refines a wanda or sparsegpt mask; {self.method} is neither")
        if self.dsnot and self.use_variant:
            raise PrunerOptionError("refine dsnot starts from wanda's per-row mask; drop use_variant")
        if self.sparsity_profile not in ("uniform", "owl"):
            raise PrunerOptionError(f"unknown sparsity_profile {self.sparsity_profile!r}: use uniform or owl")
        if self.sparsity_profile == "owl" and self.pattern.is_nm:
            raise PrunerOptionError(
                f"sparsity_profile owl needs unstructured sparsity; pattern {self.pattern} fixes every block at "
                f"{self.pattern.sparsity:g}: use pattern unstructured or sparsity_profile uniform"
            )
        check_owl_options(self.owl_threshold, self.owl_lambda)
        settings = self.reconstruct_settings()
        changed = [f"reconstruct_{name}" for name in ("epochs", "lr", "batch_size", "weight_decay", "warmup_steps")
                   if getattr(settings, name) != getattr(DEFAULTS, name)]
        if not self.reconstructs and (changed or self.reconstruct_params != "weights"):
            raise PrunerOptionError(f"{(changed or ['reconstruct_params'])[0]} applies to refine reconstruct (or "
                                    "dsnot+reconstruct): add it or drop the option")
        if self.reconstructs:
            settings.check()
        if (isinstance(self.min_expert_tokens, bool) or not isinstance(self.min_expert_tokens, int)
                or self.min_expert_tokens < 0):
            raise PrunerOptionError(f"min_expert_tokens {self.min_expert_tokens!r} is invalid: use an integer >= 0")

    @property
    def dsnot(self) -> bool:
        return self.refine in ("dsnot", "dsnot+reconstruct")

    @property
    def reconstructs(self) -> bool:
        return self.refine in ("reconstruct", "dsnot+reconstruct")

    def reconstruct_settings(self) -> ReconstructSettings:
        return ReconstructSettings(self.reconstruct_epochs, self.reconstruct_lr, self.reconstruct_batch_size,
                                   self.reconstruct_weight_decay, self.reconstruct_warmup_steps, self.seed,
                                   self.reconstruct_params)

    @property
    def needs_calibration(self) -> bool:
        """Whether the blocks run with data: the method observes inputs (magnitude does not), or reconstruct trains
        on them (OWL's data is a hook's need, read before the blocks run: magnitude with OWL still runs without)."""
        return PRUNERS[self.method].needs_calibration or self.reconstructs

    def build_pruner(self, linear: nn.Module, name: str) -> Any:
        """The method's own pruner of one linear (hooks may wrap or replace it: PruneHook.make_pruner)."""
        options = {"use_variant": self.use_variant} if self.method == "wanda" else {}
        return PRUNERS[self.method](linear, name, **options)

    def method_hooks(self) -> list[PruneHook]:
        """The hooks these options ask for, in the order they wrap pruners and run."""
        hooks: list[PruneHook] = []
        if self.dsnot:
            hooks.append(DSnoTRefinement(self.method))  # replaces the method's pruner: first
        hooks.append(ExpertFallback(self.min_expert_tokens))  # eager experts before OWL's dense pass
        if self.sparsity_profile == "owl":
            hooks.append(OwlSparsity(self.owl_threshold, self.owl_lambda))
        hooks.append(ReconstructionError())
        if self.reconstructs:  # last: after every mask is final; reads ReconstructionError's report in end_block
            hooks.append(BlockReconstruction(self.reconstruct_settings()))
        return hooks

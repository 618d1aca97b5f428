"""The recipe schema: what each key of a recipe (DESIGN.md, Recipe) accepts, as dataclasses.

Every recipe key is a dataclass field whose metadata holds an `Option` (its kind, range, choices, default in
words), so the tables below are both the types `spp run` works with and the rules spp_cli/recipe/resolve.py checks a
YAML file against. recipe/reference.py turns them into the README's recipe reference. Pure Python (no torch).

Here: the prune and eval stages, STAGE_TYPES and the Recipe. The Stage base (the keys every stage has, what a
result records) is recipe/stage_base.py; the finetune stage is recipe/finetune_schema.py. Import every stage
class from here: this module is the one table of stage types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from spp_cli.eval.placement import DEVICE_MAPS, MAX_MEMORY_TEXT, placement_problem
from spp_cli.expectations import EXPECT_TEXT
from spp_cli.recipe.finetune_schema import DISTILL_KEYS, FinetuneStage
from spp_cli.recipe.option import Option, option_field, schema_fields
from spp_cli.recipe.stage_base import COMMAND_KEYS, Fail, Stage, device_option_field, dtype_option_field
from spp_cli.vocabulary import BOS_RULES, DTYPES, PRUNE_METHODS

__all__ = ["COMMAND_KEYS", "DATASET_NAMES", "DEFAULT_SPARSITY", "DISTILL_KEYS", "RECONSTRUCT_KEYS",
           "RECONSTRUCT_PARAMS", "REFINES", "STAGE_TYPES", "EvalStage", "Fail", "FinetuneStage", "Option",
           "PruneStage", "Recipe", "Stage", "schema_fields"]

DATASET_NAMES = ("c4", "wikitext2", "alpaca", "alpaca-gpt4")  # online dataset names, never paths

REFINES = ("none", "dsnot", "reconstruct", "dsnot+reconstruct")  # pruners/options.py's, in the order they run
RECONSTRUCT_PARAMS = ("weights", "spp", "masked-lora")  # pruners/reconstruct_params.py's (it imports torch)
RECONSTRUCT_KEYS = ("reconstruct_epochs", "reconstruct_lr", "reconstruct_batch_size", "reconstruct_weight_decay",
                    "reconstruct_warmup_steps", "reconstruct_params")  # recorded only when refine reconstructs


@dataclass
class PruneStage(Stage):
    """One-shot pruning (`spp prune`)."""

    NOT_RECORDED: ClassVar[tuple[str, ...]] = ("streaming", "device")  # both paths write the same bytes
    RECORDED_WHEN_SET: ClassVar[dict[str, tuple[str, ...]]] = {
        "sparsity_profile": ("owl_threshold", "owl_lambda"), "refine": RECONSTRUCT_KEYS, "min_expert_tokens": ()}

    TYPE: ClassVar[str] = "prune"
    method: str = option_field(required=True, choices=PRUNE_METHODS, help="Pruning algorithm.")
    sparsity: float | None = option_field(
        None, "float", low=0, high=1, low_open=True, high_open=True, default_text="0.5; N/M for N:M",
        help="Fraction of zeros in each pruned linear.",
    )
    pattern: str = option_field(
        "unstructured", "pattern", help="unstructured, or N:M (N zeros in every M inputs: 2:4, 4:8)."
    )
    calib: str = option_field(
        "c4", path="source", text="a SOURCE: a .txt/.jsonl/.json path, builtin:NAME[:SPLIT] or c4",
        help="Calibration SOURCE: c4 (online), a .jsonl/.json/.txt file, builtin:python-docs[:SPLIT].",
    )
    nsamples: int = option_field(128, "int", low=1, help="Calibration windows.")
    seqlen: int | None = option_field(
        None, "int", low=2, default_text="min(2048, model's max positions)", help="Tokens per calibration window."
    )
    seed: int | None = option_field(None, "int", low=0, inherit="seed", default_text="recipe's seed",
                            help="Seed of the calibration sampling.")
    targets: str | None = option_field(
        None, "regex", default_text="every linear in the decoder blocks",
        help="Regex: prune only the linears whose name matches.",
    )
    ignore: str | None = option_field(None, "regex", help="Regex: skip the linears whose name matches.")
    use_variant: bool = option_field(False, "bool", help="Wanda: the paper's cumulative-metric variant.")
    true_sequential: bool = option_field(
        False, "bool", help="SparseGPT: re-collect statistics after each group of sub-layers."
    )
    sparsity_profile: str = option_field(
        "uniform", choices=("uniform", "owl"),
        help="uniform: every block at the sparsity; owl: per-block sparsity from its outlier ratio (OWL), same mean.",
    )
    owl_threshold: float = option_field(
        5.0, "float", low=0, low_open=True, help="OWL's M: an outlier exceeds M x the mean."
    )
    owl_lambda: float = option_field(
        0.08, "float", low=0, high=0.5, low_open=True, high_open=True,
        help="OWL's lambda: block sparsities spread over 2 x lambda (max - min), their mean still the sparsity.",
    )
    refine: str = option_field(
        "none", choices=REFINES,
        help="dsnot: refine a wanda or sparsegpt mask by prune-and-grow within each row (DSnoT), same sparsity; "
             "reconstruct: train each block's kept weights (or an adapter, reconstruct params) to reproduce its "
             "dense outputs (EBFT); dsnot+reconstruct.",
    )
    # reconstruct's own options, EBFT's defaults (pruners/reconstruct.py cites its code)
    reconstruct_epochs: int = option_field(10, "int", low=1, help="Reconstruct: passes over the windows per block.")
    reconstruct_lr: float = option_field(2e-4, "float", low=0, low_open=True, help="Reconstruct: AdamW's peak lr.")
    reconstruct_batch_size: int = option_field(8, "int", low=1, help="Reconstruct: calibration windows per step.")
    reconstruct_weight_decay: float = option_field(0.1, "float", low=0, help="Reconstruct: AdamW weight decay.")
    reconstruct_warmup_steps: int = option_field(0, "int", low=0, help="Reconstruct: linear warmup steps per block.")
    reconstruct_params: str = option_field(
        "weights", choices=RECONSTRUCT_PARAMS,
        help="Reconstruct: what trains: the kept weights, or an spp or masked-lora adapter per linear, merged "
             "right after its block.",
    )
    min_expert_tokens: int = option_field(
        16, "int", low=0, help="An MoE expert that saw fewer calibration tokens is pruned by magnitude instead.",
    )
    streaming: str = option_field(
        "auto", choices=("auto", "on", "off"),
        help="auto: from a local safetensors folder hold one block in RAM and resume a killed run at its block; "
             "off: load the whole model (same output bytes).",
    )
    device: str | None = device_option_field()
    dtype: str | None = dtype_option_field()

    def check(self, fail: Fail) -> None:
        if ":" in self.pattern:
            n, m = (int(part) for part in self.pattern.split(":"))
            if self.sparsity is None:
                self.sparsity = n / m
            elif not math.isclose(self.sparsity, n / m, abs_tol=1e-9):
                fail(
                    f"{self.sparsity:g} contradicts pattern {self.pattern} (= {n / m:g}); "
                    f"drop sparsity or make it {n / m:g}",
                    "sparsity",
                )
        elif self.sparsity is None:
            self.sparsity = DEFAULT_SPARSITY
        if self.method != "wanda" and self.use_variant:
            fail("is a Wanda option: drop it or use method wanda", "use_variant")
        if self.method != "sparsegpt" and self.true_sequential:
            fail("is a SparseGPT option: drop it or use method sparsegpt", "true_sequential")
        if self.sparsity_profile == "owl" and ":" in self.pattern:
            fail(f"owl needs pattern unstructured; {self.pattern} fixes every block's sparsity: drop one of them",
                 "sparsity_profile")
        if self.refine.startswith("dsnot") and self.method not in ("wanda", "sparsegpt"):
            fail(f"dsnot refines a wanda or sparsegpt mask, not {self.method}: use method wanda", "refine")
        if self.refine.startswith("dsnot") and self.use_variant:
            fail("dsnot starts from Wanda's per-row mask: drop use_variant", "refine")
        defaults = {f.name: f.default for f in schema_fields(PruneStage)}
        for key in RECONSTRUCT_KEYS if not self.refine.endswith("reconstruct") else ():
            if getattr(self, key) != defaults[key]:
                fail("applies to refine reconstruct (or dsnot+reconstruct): add it or drop this option", key)

    def recorded_options(self) -> dict[str, Any]:
        """Stage's rule, but reconstruct's options only when refine reconstructs (dsnot alone records none)."""
        recorded = super().recorded_options()
        return recorded if self.refine.endswith("reconstruct") else {
            key: value for key, value in recorded.items() if key not in RECONSTRUCT_KEYS}


DEFAULT_SPARSITY = 0.5  # DESIGN.md's CLI default, for recipes and commands alike


@dataclass
class EvalStage(Stage):
    """Perplexity and zero-shot evaluation (`spp eval`) of one or more models."""

    TYPE: ClassVar[str] = "eval"
    # the models count as the parents; where the model runs does not change its numbers (eval/placement.py), so
    # the placement is each model's "applied" record, not the fingerprint
    NOT_RECORDED: ClassVar[tuple[str, ...]] = ("models", "device", "device_map", "max_memory", "offload_folder")
    models: list[str] | None = option_field(
        None,
        "list",
        path="model",
        default_text="[input]",
        text="a list of models: dense, earlier stage names, local folders or hub ids",
        help="Models to evaluate.",
    )
    tasks: list[str] = option_field(
        required=True,
        kind="list",
        path="task",
        text="a list of tasks (lm-eval names, wikitext2, c4, ppl:SOURCE) or one comma-separated string",
        help="Comma-separated: wikitext2, c4, ppl:SOURCE, lm-eval task names.",
    )
    seqlen: int | None = option_field(
        None, "int", low=2, default_text="min(2048, model's max positions)", help="Perplexity window."
    )
    limit: int | None = option_field(
        None, "int", low=1, help="At most N examples per zero-shot task and N perplexity windows."
    )
    data_dir: str | None = option_field(
        None, path="dir", text="a folder laid out like the offline task bundle",
        help="Run the tasks from local files laid out like shared/data.",
    )
    batch_size: int = option_field(1, "int", low=1, help="Sequences per forward.")
    bos: str = option_field(
        "auto",
        choices=BOS_RULES,
        help="Zero-shot BOS: auto (lm-eval's default: the tokenizer's own, BOS for LLaMA), yes, or no (the "
        "Wanda/SPP harness: add_special_tokens=False).",
    )
    device: str | None = device_option_field()
    dtype: str | None = dtype_option_field()
    device_map: str | None = option_field(
        None, choices=DEVICE_MAPS, default_text="none: the whole model on the device",
        help="Spread a model larger than one device over the GPUs, the CPU and the disk (accelerate).")
    max_memory: str | None = option_field(
        None, "max_memory", text=MAX_MEMORY_TEXT, default_text="each device's free memory",
        help="With device_map: the budget per device, e.g. 0=20GiB,cpu=64GiB; only the devices named are used.")
    offload_folder: str | None = option_field(
        None, path="dir", text="a folder for weights offloaded to disk", default_text="a temporary folder",
        help="With device_map: where weights that must be re-saved to be offloaded go (a scratch folder in it).")

    def reads(self) -> list[str]:
        return list(self.models or [])

    def check(self, fail: Fail) -> None:
        problem = placement_problem(self.device_map, self.max_memory, self.offload_folder, self.device)
        if problem is not None:
            fail(problem[1], problem[0])


STAGE_TYPES: dict[str, type[Stage]] = {cls.TYPE: cls for cls in (PruneStage, FinetuneStage, EvalStage)}


@dataclass
class Recipe:
    """A validated recipe: every default filled in, stage references checked, paths absolute."""

    model: str = option_field(required=True, path="source", text="a hub id, a local model folder or builtin:tiny-llama")
    output_dir: str = option_field(
        None,
        path="dir",
        text="a folder (relative to the recipe's folder)",
        default_text="runs/<recipe stem>",
    )
    seed: int = option_field(0, "int", low=0)
    dtype: str = option_field("auto", choices=DTYPES)
    device: str = option_field("auto", "device")
    trust_remote_code: bool = option_field(
        False, "bool", help="Run the model repo's own Python code (off: only architectures transformers ships)."
    )
    allow_pickle: bool = option_field(
        False, "bool", help="Also read pickle .bin weights, which can run code when loaded (off: safetensors only)."
    )
    expect: dict | None = option_field(
        None, "expect", text=EXPECT_TEXT, default_text="nothing checked",
        help="Pinned results `spp run` checks after the last stage; a miss exits 1 (spp_cli/expectations.py).",
    )
    stages: list[Stage] = field(
        default_factory=list,
        metadata={
            "spp": Option(
                "stages", required=True, text="a non-empty list of stages, each with type: prune, finetune or eval"
            )
        },
    )

    # not a recipe key: a swept stage's name -> [{"stage", "values"}] of the stages it became (recipe/sweep.py)
    sweeps: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def stage_dir(self, name: str) -> Path:
        return Path(self.output_dir) / name

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data; `load_recipe` on its YAML gives back an equal Recipe."""
        top = {f.name: getattr(self, f.name) for f in schema_fields(Recipe)
               if f.name != "stages" and (f.name != "expect" or self.expect is not None)}  # no expect: as before
        return {**top, "stages": [stage.options() for stage in self.stages]}

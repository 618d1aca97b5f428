"""The recipe schema: what each key of a recipe (DESIGN.md, Recipe) accepts, as dataclasses.

Every recipe key is a dataclass field whose metadata holds an `Option` (its kind, range, choices, default in
words), so the tables below are both the types `spp run` works with and the rules spp_cli/recipe/resolve.py checks a
YAML file against. recipe/reference.py turns them into the README's recipe reference. Pure Python (no torch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from spp_cli.adapters import REGISTRY, misplaced_option
from spp_cli.eval.placement import DEVICE_MAPS, MAX_MEMORY_TEXT, placement_problem
from spp_cli.expectations import EXPECT_TEXT
from spp_cli.recipe.option import Option, option_field, schema_fields
from spp_cli.vocabulary import (
    BOS_RULES,
    DATA_FORMATS,
    DTYPES,
    FINETUNE_METHODS,
    LOSS_NORMALIZATIONS,
    PRUNE_METHODS,
    REPORT_TO,
    SPP_FORWARDS,
)

DATASET_NAMES = ("c4", "wikitext2", "alpaca", "alpaca-gpt4")  # online dataset names, never paths
Fail = Callable[..., NoReturn]  # fail(message, key) raises BadInput naming the key path


def _deviceoption_field() -> Any:
    return option_field(None, "device", inherit="device", default_text="recipe's device", help="Compute device.")


def _dtypeoption_field() -> Any:
    return option_field(
        None, choices=DTYPES, inherit="dtype", default_text="recipe's dtype",
        help="Compute dtype; auto is the checkpoint's (on a CPU: fp32 to fine-tune, and to prune fp16).",
    )


def _method_defaults(key: str) -> str:
    """The default of a per-method option in words, e.g. "spp 16" or "spp 4e-3, lora 3e-4, ..."."""
    pairs = [(m.name, m.default_lr if key == "lr" else m.options[key]) for m in REGISTRY.values()
             if key == "lr" or key in m.options]
    return ", ".join(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}" for name, value in pairs)


REFINES = ("none", "dsnot", "reconstruct", "dsnot+reconstruct")  # pruners/options.py's, in the order they run
RECONSTRUCT_PARAMS = ("weights", "spp", "masked-lora")  # pruners/reconstruct_params.py's (it imports torch)
RECONSTRUCT_KEYS = ("reconstruct_epochs", "reconstruct_lr", "reconstruct_batch_size", "reconstruct_weight_decay",
                    "reconstruct_warmup_steps", "reconstruct_params")  # recorded only when refine reconstructs
DISTILL_KEYS = ("teacher", "distill_temperature", "distill_weight")  # recorded only when objective is distill
COMMAND_KEYS = ("name", "input")  # recipe-only: a command names its model and output itself
_MODEL_REF = "dense (the recipe's model), an earlier prune/finetune stage's name, a local model folder or a hub id"


@dataclass
class Stage:
    """Keys every stage has. After loading, `input` is "dense", an earlier stage's name, or a path / hub id."""

    TYPE: ClassVar[str] = ""
    # What decides a stage's result is recorded (spp.json's or results.json's "config") and fingerprinted, by one
    # rule for every stage (`recorded_options`): every key but the command keys (name, input: the parent counts by
    # its manifest) and NOT_RECORDED (what does not change the result); each key of RECORDED_WHEN_SET, with the keys
    # that only mean something then, only when it is not its default (so the fingerprints of runs made before that
    # key existed stay what they were).
    NOT_RECORDED: ClassVar[tuple[str, ...]] = ()
    RECORDED_WHEN_SET: ClassVar[dict[str, tuple[str, ...]]] = {}
    name: str = option_field(
        "", text="a name of letters, digits, _ and - (the folder <output_dir>/<name>)", default_text="its type"
    )
    input: str | None = option_field(
        None, path="model", text=_MODEL_REF, default_text="previous model stage, else dense"
    )

    def options(self) -> dict[str, Any]:
        """The resolved options, in schema order: what the manifest's `config` and the fingerprint record."""
        values = dataclasses.asdict(self)
        return {"name": values.pop("name"), "type": self.TYPE, **values}

    def command_options(self) -> dict[str, Any]:
        """Every key a stage function takes as a keyword (all but the recipe's name and input)."""
        return {f.name: getattr(self, f.name) for f in schema_fields(type(self)) if f.name not in COMMAND_KEYS}

    def recorded_options(self) -> dict[str, Any]:
        """The options that decide the result, in schema order, by the rule above NOT_RECORDED."""
        optional = {key for key, companions in self.RECORDED_WHEN_SET.items() for key in (key, *companions)}
        recorded = {f.name: getattr(self, f.name) for f in schema_fields(type(self))
                    if f.name not in (*COMMAND_KEYS, *self.NOT_RECORDED) and f.name not in optional}
        defaults = {f.name: f.default for f in schema_fields(type(self))}
        for key, companions in self.RECORDED_WHEN_SET.items():
            if getattr(self, key) != defaults[key]:
                recorded |= {name: getattr(self, name) for name in (key, *companions)}
        return recorded

    def reads(self) -> list[str]:
        """The models this stage reads: "dense", stage names, paths or hub ids."""
        return [self.input] if self.input is not None else []

    def check(self, fail: Fail) -> None:
        """Checks across keys (may fill a default that depends on another key); `fail(message, key)` raises."""


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
    device: str | None = _deviceoption_field()
    dtype: str | None = _dtypeoption_field()

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
class FinetuneStage(Stage):
    """Sparsity-preserving fine-tuning (`spp finetune`)."""

    TYPE: ClassVar[str] = "finetune"
    NOT_RECORDED: ClassVar[tuple[str, ...]] = ("report_to", "logging_steps", "save_steps", "device",
                                               "eval_data_dir")  # logs, saves, where data is read from
    RECORDED_WHEN_SET: ClassVar[dict[str, tuple[str, ...]]] = {"objective": DISTILL_KEYS,  # sft: as before
                                                               "eval_steps": (),
                                                               "eval_ppl_source": ("eval_ppl_windows",)}
    method: str = option_field(
        "spp", choices=FINETUNE_METHODS,
        help="Recovery method: spp, masked-lora, ia3, masked-full keep every zero; lora is the dense baseline.",
    )
    data: str = option_field(
        required=True,
        path="source",
        text="a SOURCE: a .txt/.jsonl/.json path, builtin:NAME[:SPLIT], alpaca, alpaca-gpt4 or hf:ORG/NAME[:SPLIT]",
        help="Training SOURCE: alpaca/chat/text .json(l), alpaca-gpt4 (online), builtin:python-docs[:SPLIT].",
    )
    max_steps: int | None = option_field(
        None, "int", low=1, default_text="from epochs", help="Optimizer steps (overrides epochs)."
    )
    epochs: float = option_field(3.0, "float", low=0, low_open=True, help="Passes over the data.")
    lr: float | None = option_field(
        None, "float", low=0, low_open=True, default_text=_method_defaults("lr"),
        help="Peak learning rate; the default is the method's published one.",
    )
    batch_size: int = option_field(128, "int", low=1, help="Global batch = micro_batch_size x accumulation x devices.")
    micro_batch_size: int = option_field(8, "int", low=1, help="Per-device batch.")
    seqlen: int = option_field(512, "int", low=2, help="Tokens per example (cutoff).")
    seed: int = option_field(42, "int", low=0, help="Seed of the data order, the held-out split and the adapter init.")
    # method-specific options: None means the method's default (spp_cli/adapters/__init__.py); giving one to a
    # method that does not read it is bad input
    groups: int | None = option_field(
        None, "int", low=1, default_text=_method_defaults("groups"), help="SPP row groups G (alpha has shape G x in)."
    )
    dropout: float | None = option_field(
        None, "float", low=0, high=1, high_open=True, default_text=_method_defaults("dropout"),
        help="Dropout on the adapter branch input; for spp, 0 allows the exact fused forward.",
    )
    forward: str | None = option_field(
        None, choices=SPP_FORWARDS, default_text=_method_defaults("forward"),
        help="SPP forward: auto (fused when dropout is 0, else recompute), naive, recompute, fused.",
    )
    lora_r: int | None = option_field(
        None, "int", low=1, default_text=_method_defaults("lora_r"),
        help="LoRA rank r (for spp it only sets the scale lora_alpha / lora_r).",
    )
    lora_alpha: float | None = option_field(
        None, "float", low=0, low_open=True, default_text=_method_defaults("lora_alpha"),
        help="LoRA alpha: the branch is scaled by lora_alpha / lora_r.",
    )
    objective: str = option_field(
        "sft", choices=("sft", "distill"),
        help="sft: next-token cross-entropy on the data; distill: KL(teacher || student) on the same batches, "
             "mixed with sft by distill_weight.",
    )
    teacher: str | None = option_field(
        None, path="source", text="a local model folder or a hub id",
        default_text="the dense ancestor in spp.json's parent chain",
        help="Distill: the teacher model (same tokenizer); default: the model the input was pruned from.",
    )
    distill_temperature: float = option_field(
        1.0, "float", low=0, low_open=True, help="Distill: softmax temperature T of both models (the KL is x T^2)."
    )
    distill_weight: float = option_field(
        1.0, "float", low=0, high=1, help="Distill: loss = weight x KL + (1 - weight) x sft cross-entropy.",
    )
    data_format: str = option_field(
        "auto",
        choices=DATA_FORMATS,
        help="How records become examples: auto (instruction fields -> alpaca template, messages -> chat, "
        "else packed text) or one format for every record.",
    )
    mask_prompt: bool = option_field(False, "bool", help="No loss on prompt tokens.")
    gradient_checkpointing: bool = option_field(False, "bool", help="Recompute activations in backward (less memory).")
    no_merge: bool = option_field(False, "bool", help="Keep only the adapter; merge later with spp merge.")
    val_size: int | None = option_field(
        None, "int", low=0, default_text="min(2000, 5%)", help="Held-out examples for the eval loss."
    )
    weight_decay: float = option_field(0.001, "float", low=0, help="AdamW weight decay.")
    warmup_ratio: float = option_field(
        0.03, "float", low=0, high=1, high_open=True, help="Linear warm-up, as a fraction of the steps."
    )
    loss_normalization: str = option_field(
        "batch",
        choices=LOSS_NORMALIZATIONS,
        help="Average a step's loss over all its target tokens (batch, transformers 5.x) or per micro-batch "
        "(micro_batch, SPP's reference on transformers 4.28).",
    )
    # the recovery curve (spp_cli/training/curve.py): recorded only when asked, so earlier fingerprints stand
    eval_steps: int | None = option_field(
        None, "int", low=1, default_text="at each checkpoint, no curve",
        help="Score the held-out loss at the start, every N steps and at the end; spp.json keeps the curve.",
    )
    eval_ppl_source: str | None = option_field(
        None, path="task", text="a perplexity task: wikitext2, c4 or ppl:SOURCE",
        help="With eval_steps: also a token perplexity on this source at every point (wikitext2, c4, ppl:SOURCE).",
    )
    eval_ppl_windows: int = option_field(
        8, "int", low=1, help="eval_ppl_source: score its first N windows of seqlen tokens."
    )
    eval_data_dir: str | None = option_field(
        None, path="dir", text="a folder laid out like the offline task bundle",
        help="eval_ppl_source wikitext2 or c4 from local files laid out like shared/data.",
    )
    report_to: str = option_field("none", choices=REPORT_TO, help="Where the Trainer logs.")
    save_steps: int = option_field(200, "int", low=1, help="Trainer checkpoint (a resume point) every N steps.")
    logging_steps: int = option_field(10, "int", low=1, help="Log the training loss every N steps.")
    device: str | None = _deviceoption_field()
    dtype: str | None = _dtypeoption_field()

    def check(self, fail: Fail) -> None:
        self._check_curve(fail)
        if self.batch_size % self.micro_batch_size:
            fail(
                f"{self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}; "
                "the global batch is micro_batch_size x accumulation steps x world size",
                "batch_size",
            )
        misplaced = misplaced_option(self.method, dataclasses.asdict(self))
        if misplaced is not None:
            users = " or ".join(m.name for m in REGISTRY.values() if misplaced in m.options)
            fail(f"applies to method {users}, not {self.method}; drop it or change the method", misplaced)
        defaults = {f.name: f.default for f in schema_fields(FinetuneStage)}
        for key in DISTILL_KEYS if self.objective != "distill" else ():
            if getattr(self, key) != defaults[key]:
                fail("applies to objective distill: set objective distill (--objective distill) or drop this option",
                     key)

    def _check_curve(self, fail: Fail) -> None:
        """The curve's options make sense only together: a ppl needs eval_steps, eval_steps a held-out split."""
        if self.eval_steps is not None and self.val_size == 0:
            fail("scores the held-out split, which val_size 0 leaves empty: drop val_size 0 or eval_steps",
                 "eval_steps")
        if self.eval_ppl_source is not None and self.eval_steps is None:
            fail("is scored at every eval_steps: add eval_steps N or drop it", "eval_ppl_source")
        if self.eval_ppl_source is not None and not (
                self.eval_ppl_source in ("wikitext2", "c4") or self.eval_ppl_source.startswith("ppl:")):
            fail(f"{self.eval_ppl_source!r} is not a perplexity task: use wikitext2, c4 or ppl:SOURCE",
                 "eval_ppl_source")
        defaults = {f.name: f.default for f in schema_fields(FinetuneStage)}
        for key in ("eval_ppl_windows", "eval_data_dir"):
            if self.eval_ppl_source is None and getattr(self, key) != defaults[key]:
                fail("applies to eval_ppl_source: add it or drop this option", key)


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
    device: str | None = _deviceoption_field()
    dtype: str | None = _dtypeoption_field()
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

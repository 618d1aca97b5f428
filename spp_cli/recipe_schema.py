"""The recipe schema: what each key of a recipe (DESIGN.md, Recipe) accepts, as dataclasses.

Every recipe key is a dataclass field whose metadata holds an `Option` (its kind, range, choices, default in
words), so the tables below are both the types `spp run` works with and the rules spp_cli/recipe.py checks a
YAML file against. `describe_schema` turns them into the README's recipe reference. Pure Python (no torch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import yaml

from spp_cli.data.formats import DATA_FORMATS
from spp_cli.eval.zeroshot import BOS_RULES

DTYPES = ("auto", "float32", "bfloat16", "float16")
DATASET_NAMES = ("c4", "wikitext2", "alpaca", "alpaca-gpt4")  # online dataset names, never paths
Fail = Callable[..., NoReturn]  # fail(message, key) raises BadInput naming the key path


@dataclass(frozen=True)
class Option:
    """What one recipe key accepts. Lives in the dataclass field's metadata, so the table is the code."""

    kind: str  # str | int | float | bool | list | regex | pattern | device | stages
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is excluded
    high_open: bool = False
    required: bool = False
    nullable: bool = False
    path: str = ""  # how to resolve: "source" (SOURCE or model), "dir" (always a path), "model" (a model ref), "task"
    text: str = ""  # what is allowed, in words, when the kind alone does not say it
    default_text: str = ""  # the default, in words, when it is computed
    help: str = ""  # one sentence for `--help` and the README's recipe reference

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.text:
            return self.text
        if self.kind in ("int", "float"):
            noun = "an integer" if self.kind == "int" else "a number"
            if self.low is not None and self.high is not None:
                left, right = "(["[not self.low_open], ")]"[not self.high_open]
                return f"{noun} in {left}{self.low:g}, {self.high:g}{right}"
            if self.low is not None:
                return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
            return noun
        return {
            "bool": "true or false",
            "list": "a list of strings (or one comma-separated string)",
            "regex": "a Python regular expression",
            "pattern": "unstructured or N:M with 0 < N < M (e.g. 2:4)",
            "device": "auto, cpu, cuda, cuda:N or mps",
        }.get(self.kind, "a string")

    def in_range(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))


def _key(default: Any = None, kind: str = "str", *, required: bool = False, **option: Any) -> Any:
    """A dataclass field that is a recipe key; `default=None` (and not required) means null is allowed."""
    spec = Option(kind, required=required, nullable=default is None and not required, **option)
    return field(default=default, metadata={"spp": spec})


def _device_key() -> Any:
    return _key(None, "device", default_text="recipe's device")


def _dtype_key() -> Any:
    return _key(None, choices=DTYPES, default_text="recipe's dtype")


_MODEL_REF = "dense (the recipe's model), an earlier prune/finetune stage's name, a local model folder or a hub id"


@dataclass
class Stage:
    """Keys every stage has. After loading, `input` is "dense", an earlier stage's name, or a path / hub id."""

    TYPE: ClassVar[str] = ""
    name: str = _key(
        "", text="a name of letters, digits, _ and - (the folder <output_dir>/<name>)", default_text="its type"
    )
    input: str | None = _key(None, path="model", text=_MODEL_REF, default_text="previous model stage, else dense")

    def options(self) -> dict[str, Any]:
        """The resolved options, in schema order: what the manifest's `config` and the fingerprint record."""
        values = dataclasses.asdict(self)
        return {"name": values.pop("name"), "type": self.TYPE, **values}

    def reads(self) -> list[str]:
        """The models this stage reads: "dense", stage names, paths or hub ids."""
        return [self.input] if self.input is not None else []

    def check(self, fail: Fail) -> None:
        """Checks across keys (may fill a default that depends on another key); `fail(message, key)` raises."""


@dataclass
class PruneStage(Stage):
    """One-shot pruning (`spp prune`)."""

    TYPE: ClassVar[str] = "prune"
    method: str = _key(required=True, choices=("magnitude", "wanda", "sparsegpt"))
    sparsity: float | None = _key(
        None, "float", low=0, high=1, low_open=True, high_open=True, default_text="N/M if N:M"
    )
    pattern: str = _key("unstructured", "pattern")
    calib: str = _key("c4", path="source", text="a SOURCE: a .txt/.jsonl/.json path, builtin:NAME[:SPLIT] or c4")
    nsamples: int = _key(128, "int", low=1)
    seqlen: int | None = _key(None, "int", low=1, default_text="min(2048, model's max positions)")
    seed: int | None = _key(None, "int", low=0, default_text="recipe's seed")
    targets: str | None = _key(None, "regex", default_text="every linear in the decoder blocks")
    ignore: str | None = _key(None, "regex")
    use_variant: bool = _key(False, "bool")
    true_sequential: bool = _key(False, "bool")
    device: str | None = _device_key()
    dtype: str | None = _dtype_key()

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
            fail("missing; pattern unstructured needs a sparsity, a number in (0, 1)", "sparsity")


@dataclass
class FinetuneStage(Stage):
    """Sparsity-preserving fine-tuning (`spp finetune`)."""

    TYPE: ClassVar[str] = "finetune"
    method: str = _key("spp", choices=("spp", "lora"))
    data: str = _key(
        required=True,
        path="source",
        text="a SOURCE: a .txt/.jsonl/.json path, builtin:NAME[:SPLIT], alpaca, alpaca-gpt4 or hf:ORG/NAME[:SPLIT]",
    )
    max_steps: int | None = _key(None, "int", low=1, default_text="from epochs")
    epochs: float = _key(3.0, "float", low=0, low_open=True)
    lr: float = _key(4e-3, "float", low=0, low_open=True)
    batch_size: int = _key(128, "int", low=1)  # global: micro_batch_size x accumulation x world size
    micro_batch_size: int = _key(8, "int", low=1)  # per device
    seqlen: int = _key(512, "int", low=1)
    seed: int = _key(42, "int", low=0)
    groups: int = _key(16, "int", low=1)
    dropout: float = _key(0.05, "float", low=0, high=1, high_open=True)
    forward: str = _key("auto", choices=("auto", "naive", "grouped", "fused"))
    data_format: str = _key(
        "auto",
        choices=DATA_FORMATS,
        help="How records become examples: auto (instruction fields -> alpaca template, messages -> chat, "
        "else packed text) or one format for every record.",
    )
    mask_prompt: bool = _key(False, "bool")
    gradient_checkpointing: bool = _key(False, "bool")
    no_merge: bool = _key(False, "bool")
    val_size: int | None = _key(None, "int", low=0, default_text="min(2000, 5%)")
    weight_decay: float = _key(0.001, "float", low=0)
    warmup_ratio: float = _key(0.03, "float", low=0, high=1, high_open=True)
    loss_normalization: str = _key(
        "batch",
        choices=("batch", "micro_batch"),
        help="Average a step's loss over all its target tokens (batch, transformers 5.x) or per micro-batch "
        "(micro_batch, SPP's reference on transformers 4.28).",
    )
    report_to: str = _key("none", choices=("none", "tensorboard", "wandb"))
    save_steps: int | None = _key(None, "int", low=1, default_text="Trainer's")
    device: str | None = _device_key()
    dtype: str | None = _dtype_key()

    def check(self, fail: Fail) -> None:
        if self.batch_size % self.micro_batch_size:
            fail(
                f"{self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}; "
                "the global batch is micro_batch_size x accumulation steps x world size",
                "batch_size",
            )


@dataclass
class EvalStage(Stage):
    """Perplexity and zero-shot evaluation (`spp eval`) of one or more models."""

    TYPE: ClassVar[str] = "eval"
    models: list[str] | None = _key(
        None,
        "list",
        path="model",
        default_text="[input]",
        text="a list of models: dense, earlier stage names, local folders or hub ids",
    )
    tasks: list[str] = _key(
        required=True,
        kind="list",
        path="task",
        text="a list of tasks (lm-eval names, wikitext2, c4, ppl:SOURCE) or one comma-separated string",
    )
    seqlen: int | None = _key(None, "int", low=1, default_text="min(2048, model's max positions)")
    limit: int | None = _key(None, "int", low=1)
    data_dir: str | None = _key(None, path="dir", text="a folder laid out like the offline task bundle")
    batch_size: int = _key(1, "int", low=1)
    bos: str = _key(
        "auto",
        choices=BOS_RULES,
        help="Zero-shot BOS: auto (lm-eval's default: the tokenizer's own, BOS for LLaMA), yes, or no (the "
        "Wanda/SPP harness: add_special_tokens=False); quote it in YAML (\"no\").",
    )
    device: str | None = _device_key()
    dtype: str | None = _dtype_key()

    def reads(self) -> list[str]:
        return list(self.models or [])


STAGE_TYPES: dict[str, type[Stage]] = {cls.TYPE: cls for cls in (PruneStage, FinetuneStage, EvalStage)}


@dataclass
class Recipe:
    """A validated recipe: every default filled in, stage references checked, paths absolute."""

    model: str = _key(required=True, path="source", text="a hub id, a local model folder or builtin:tiny-llama")
    output_dir: str = _key(
        None,
        path="dir",
        text="a folder (relative to the recipe's folder)",
        default_text="runs/<recipe stem>",
    )
    seed: int = _key(0, "int", low=0)
    dtype: str = _key("auto", choices=DTYPES)
    device: str = _key("auto", "device")
    trust_remote_code: bool = _key(False, "bool")
    allow_pickle: bool = _key(False, "bool")
    stages: list[Stage] = field(
        default_factory=list,
        metadata={
            "spp": Option(
                "stages", required=True, text="a non-empty list of stages, each with type: prune, finetune or eval"
            )
        },
    )

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
        top = {f.name: getattr(self, f.name) for f in schema_fields(Recipe) if f.name != "stages"}
        return {**top, "stages": [stage.options() for stage in self.stages]}


def schema_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "spp" in f.metadata]


def describe_schema() -> list[tuple[str, str, str, str, str]]:
    """Rows (stage type or "recipe", key, type, default, allowed) for the README's recipe reference."""
    rows = []
    for section, cls in [("recipe", Recipe), *STAGE_TYPES.items()]:
        for f in schema_fields(cls):
            option: Option = f.metadata["spp"]
            if option.required:
                default = "required"
            elif option.default_text:
                default = option.default_text
            else:
                default = yaml.safe_dump(f.default, default_flow_style=True).removesuffix("\n...\n").strip()
            rows.append((section, f.name, str(f.type), default, option.allowed()))
            if f.name == "name" and section != "recipe":
                rows.append((section, "type", "str", "required", section))
    return rows

"""The finetune stage's schema (`spp finetune`, a recipe's type: finetune): every key's kind, range, default and
help, what its fingerprint records, and its checks across keys (spp_cli/recipe/stage_base.py's Stage rules).
Pure Python (no torch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from spp_cli.adapters import REGISTRY, misplaced_option
from spp_cli.recipe.option import option_field, schema_fields
from spp_cli.recipe.stage_base import Fail, Stage, device_option_field, dtype_option_field, method_defaults
from spp_cli.vocabulary import DATA_FORMATS, FINETUNE_METHODS, LOSS_NORMALIZATIONS, REPORT_TO, SPP_FORWARDS

DISTILL_KEYS = ("teacher", "distill_temperature", "distill_weight")  # recorded only when objective is distill


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
        None, "float", low=0, low_open=True, default_text=method_defaults("lr"),
        help="Peak learning rate; the default is the method's published one.",
    )
    batch_size: int = option_field(128, "int", low=1, help="Global batch = micro_batch_size x accumulation x devices.")
    micro_batch_size: int = option_field(8, "int", low=1, help="Per-device batch.")
    seqlen: int = option_field(512, "int", low=2, help="Tokens per example (cutoff).")
    seed: int = option_field(42, "int", low=0, help="Seed of the data order, the held-out split and the adapter init.")
    # method-specific options: None means the method's default (spp_cli/adapters/__init__.py); giving one to a
    # method that does not read it is bad input
    groups: int | None = option_field(
        None, "int", low=1, default_text=method_defaults("groups"), help="SPP row groups G (alpha has shape G x in)."
    )
    dropout: float | None = option_field(
        None, "float", low=0, high=1, high_open=True, default_text=method_defaults("dropout"),
        help="Dropout on the adapter branch input; for spp, 0 allows the exact fused forward.",
    )
    forward: str | None = option_field(
        None, choices=SPP_FORWARDS, default_text=method_defaults("forward"),
        help="SPP forward: auto (fused when dropout is 0, else recompute), naive, recompute, fused.",
    )
    lora_r: int | None = option_field(
        None, "int", low=1, default_text=method_defaults("lora_r"),
        help="LoRA rank r (for spp it only sets the scale lora_alpha / lora_r).",
    )
    lora_alpha: float | None = option_field(
        None, "float", low=0, low_open=True, default_text=method_defaults("lora_alpha"),
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
    device: str | None = device_option_field()
    dtype: str | None = dtype_option_field()

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

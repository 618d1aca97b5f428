"""What the finetune stage's steps hand each other (spp_cli/stages/finetune.py, finetune_merge.py): the plan
`resolve` decides before any weights are read, the base `load` read, and the dtype a model is loaded in to train.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spp_cli.io import atomic
from spp_cli.recipe.schema import FinetuneStage


def training_dtype(dtype: str, device: str) -> str:
    """The dtype the model loads in to train: fp32 on CPU; the checkpoint's dtype elsewhere (autocast handles
    bf16/fp16 on GPUs)."""
    if dtype == "auto" and device == "cpu":
        return "float32"
    return dtype


@dataclass
class FinetunePlan:
    """What `resolve` decides before any weights are read."""

    model_dir: str  # as given: a directory, a hub id or builtin:NAME (what load_model reads)
    model_path: str  # its local directory
    out: Path
    options: FinetuneStage  # validated; device and dtype resolved
    adapter: Any  # the method's adapter, not yet injected (keeps_zeros, adapts_fused_experts)
    parent_manifest: dict | None  # the parent's spp.json (None for a model spp did not write)
    config: dict  # the fingerprinted options: spp.json's "config"
    fingerprint: str
    loading: dict  # trust_remote_code, allow_pickle

    @property
    def work_dir(self) -> Path:
        """Trainer checkpoints and the adapter until the stage completes (a rerun resumes from them)."""
        return atomic.work_dir(self.out)


@dataclass
class LoadedBase:
    """The model `load` read, with what the later steps compare against."""

    model: Any
    tokenizer: Any
    pruned: list[str]  # every pruned layer (fused MoE expert slices included)
    targets: list[str]  # the ones the method adapts
    parent_zeros: dict[str, str]  # name -> zeros_sha256 before training
    stored_dtype: Any  # the checkpoint's dtype, which the merged model is saved in
    teacher: Any = None  # objective distill: the frozen teacher model (released after training)
    teacher_record: dict | None = None  # spp.json's "distillation" and the teacher's MiB (teacher.load_teacher)

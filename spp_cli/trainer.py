"""SPP (or LoRA) fine-tuning on transformers' Trainer, so accelerate's DDP / FSDP / DeepSpeed come for free.

    result = run_finetune(model, tokenizer, records, FinetuneConfig(max_steps=200), work_dir, target_names=names)
    merged = merge_trained(result)            # SPP: same zeros; LoRA: dense (result.dense_after_merge)

Defaults are SPP's (spec/spp-method.md §2): AdamW lr 4e-3, weight decay 0.001, linear schedule with 3% warm-up,
global batch 128 = micro × accumulation × world size, seqlen 512, 3 epochs, seed 42. Trainer checkpoints hold the
trainable parameters only (adapter_model.safetensors) plus optimizer, scheduler, RNG and trainer state, so they
stay small and resume exactly: rerunning with the same work_dir continues from work_dir/checkpoints' last one.

Multi-GPU: launch the same program with `torchrun` or `accelerate launch --config_file recipes/launch/...`; every
rank runs run_finetune, and only the main process (result.is_main_process) should merge and save, on the full
weights (under FSDP / ZeRO-3 the Trainer gathers them into result.model at the end of training).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from spp_cli.adapters.spp import SPPConfig, inject_spp, merge_spp
from spp_cli.adapters.spp_files import ADAPTER_WEIGHTS_NAME, save_spp_adapter
from spp_cli.data.examples import PaddingCollator, build_examples, pad_token_id
from spp_cli.errors import BadInput, RuntimeFailure
from spp_cli.vocabulary import LOSS_NORMALIZATIONS

METHODS = ("spp", "lora")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
# How a step's loss is averaged (docs/fidelity.md): "batch" = transformers 5.x's default, the mean over every
# target token of the optimizer step (all micro-batches, all devices); "micro_batch" = SPP's reference
# (transformers 4.28): each micro-batch's own token mean, averaged over accumulation steps and devices.


@dataclass
class FinetuneConfig:
    """Options of `spp finetune` (DESIGN.md, CLI); every field is also a recipe key."""

    method: str = "spp"  # spp | lora
    max_steps: int | None = None  # None: train for `epochs`
    epochs: float = 3
    lr: float = 4e-3
    batch_size: int = 128  # global: micro_batch_size × accumulation × world size
    micro_batch_size: int = 8  # per device
    seqlen: int = 512
    seed: int = 42
    groups: int = 16
    dropout: float = 0.05
    forward: str = "auto"  # SPP forward variant (spp_cli.adapters.spp.FORWARD_VARIANTS)
    lora_r: int = 8  # LoRA rank; for SPP it only sets the scale lora_alpha / lora_r
    lora_alpha: float = 16
    mask_prompt: bool = False
    gradient_checkpointing: bool = False
    val_size: int | float | None = None  # None: min(2000, 5% of the examples); 0: no held-out split
    weight_decay: float = 0.001
    warmup_ratio: float = 0.03
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    loss_normalization: str = "batch"  # LOSS_NORMALIZATIONS
    report_to: str = "none"  # none | tensorboard | wandb
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # training precision: auto (bf16/fp16 autocast on GPU, fp32 on CPU) | float32 | ...
    logging_steps: int = 10
    save_steps: int = 200
    eval_steps: int | None = None  # None: save_steps
    save_total_limit: int = 2

    def gradient_accumulation(self, world_size: int) -> int:
        """Accumulation steps so that micro × accumulation × world = batch_size (BadInput otherwise)."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step != 0:
            raise BadInput(f"--batch-size {self.batch_size} is not divisible by --micro-batch-size "
                           f"{self.micro_batch_size} x {world_size} processes: use a multiple of {per_step}")
        return self.batch_size // per_step

    def validate(self, world_size: int = 1) -> None:
        if self.method not in METHODS:
            raise BadInput(f"--method {self.method!r} is unknown: use spp or lora")
        for name in ("batch_size", "micro_batch_size", "seqlen", "logging_steps", "save_steps", "lora_r"):
            if getattr(self, name) <= 0:
                raise BadInput(f"--{name.replace('_', '-')} {getattr(self, name)} is invalid: use a positive integer")
        if self.max_steps is not None and self.max_steps <= 0:
            raise BadInput(f"--max-steps {self.max_steps} is invalid: use a positive integer (or --epochs)")
        if self.max_steps is None and not self.epochs > 0:
            raise BadInput(f"--epochs {self.epochs} is invalid: use a positive number")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BadInput(f"--lr {self.lr} is invalid: use a positive number (default 4e-3)")
        if self.dtype not in PRECISIONS:
            raise BadInput(f"--dtype {self.dtype!r} is unknown: use one of {', '.join(PRECISIONS)}")
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise BadInput(f"--loss-normalization {self.loss_normalization!r} is unknown: use batch or micro_batch")
        if self.val_size is not None and self.val_size < 0:
            raise BadInput(f"--val-size {self.val_size} is invalid: use 0 (none), a count, or a fraction < 1")
        self.gradient_accumulation(world_size)
        if self.method == "spp":
            self.spp_config([]).validate()

    def spp_config(self, targets: list[str]) -> SPPConfig:
        return SPPConfig(groups=self.groups, lora_alpha=self.lora_alpha, r=self.lora_r, dropout=self.dropout,
                         target_modules=list(targets), forward=self.forward)


@dataclass
class FinetuneResult:
    """What a fine-tune produced. `model` still carries its adapters (SPP layers, or a PEFT LoRA model)."""

    model: nn.Module
    method: str
    train_curve: list[dict]  # [{"step", "loss", "lr"}] as logged every logging_steps
    eval_loss: float | None
    seconds: float
    steps: int
    resumed_from: str | None  # the checkpoint this run resumed from, if any
    trainable_params: int
    targets: list[str]
    spp_config: SPPConfig | None
    adapter_state: dict[str, torch.Tensor]  # trained parameters by name, full (gathered) CPU tensors
    dense_after_merge: bool  # LoRA: merging makes every target dense (its zeros are lost); SPP: False
    is_main_process: bool = True
    config: dict = field(default_factory=dict)
    parallelism: str = "single"  # what the Trainer really ran: single | ddp | fsdp1 | fsdp2 | deepspeed


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def split_examples(examples: list[dict], val_size: int | float | None, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): val_size None -> min(2000, 5%); a float < 1 -> that fraction; 0 -> no held-out set."""
    if val_size is None:
        count = min(2000, int(0.05 * len(examples)))
    elif isinstance(val_size, float) and val_size < 1:
        count = int(val_size * len(examples))
    else:
        count = int(val_size)
    if count <= 0:
        return examples, []
    if count >= len(examples):
        raise BadInput(f"--val-size {val_size} leaves no training examples out of {len(examples)}: use a smaller one")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in order[count:]], [examples[i] for i in order[:count]]


def _uses_cuda(device: str) -> bool:
    """Whether training runs on CUDA: "auto" when a GPU is visible, "cuda" (pick GPUs by CUDA_VISIBLE_DEVICES)."""
    if device == "cpu":
        return False
    if device == "auto":
        return torch.cuda.is_available()
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInput(f"--device {device} but no CUDA device is available: use --device cpu (or auto)")
        return True
    raise BadInput(f"--device {device!r} is unknown: use auto, cpu or cuda")


def _precision_flags(config: FinetuneConfig, on_cuda: bool) -> dict:
    """Trainer's bf16/fp16 flags: autocast on GPU (bf16 where supported), fp32 on CPU."""
    if config.dtype == "float32" or not on_cuda:
        if config.dtype in ("bfloat16", "float16") and not on_cuda:
            raise BadInput(f"--dtype {config.dtype} training needs a GPU: use --dtype float32 (or auto) on CPU")
        return {}
    if config.dtype == "bfloat16" or (config.dtype == "auto" and torch.cuda.is_bf16_supported()):
        return {"bf16": True}
    return {"fp16": True}


def _make_trainer_class():
    from transformers import Trainer

    class AdapterTrainer(Trainer):
        """A Trainer whose checkpoints hold only the trainable parameters and that stops on a non-finite loss."""

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            from safetensors.torch import save_file

            output_dir = output_dir or self.args.output_dir
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            if state_dict is None:  # FSDP / ZeRO-3 pass the gathered state dict, filtered here
                state_dict = model.state_dict()
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k in trainable}
            save_file(tensors, os.path.join(output_dir, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            if not self.is_fsdp_enabled:
                return super()._save_optimizer_and_scheduler(output_dir)
            # Trainer's FSDP branch would also gather and write the whole model, frozen base included
            # (pytorch_model_fsdp.bin): the trained tensors are in adapter_model.safetensors already
            from accelerate.utils import save_fsdp_optimizer

            save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                                output_dir)
            if self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
            from safetensors.torch import load_file

            path = os.path.join(resume_from_checkpoint, ADAPTER_WEIGHTS_NAME)
            if not os.path.isfile(path):
                raise BadInput(f"{resume_from_checkpoint} has no {ADAPTER_WEIGHTS_NAME}: remove the damaged "
                               "checkpoint (or the work directory) and rerun")
            model = self.accelerator.unwrap_model(model or self.model, keep_torch_compile=False)
            state = load_file(path)
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            if set(state) != trainable:
                raise BadInput(f"checkpoint {resume_from_checkpoint} does not match this run's adapters (different "
                               "method, targets or groups): use a new output directory or --overwrite")
            model.load_state_dict(_shard_like(model, state), strict=False)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            finite = torch.isfinite(loss.detach()).to(torch.float32)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)  # every rank stops together
            if finite.item() == 0:
                raise NonFiniteLoss(self.state.global_step + 1)
            return loss

    return AdapterTrainer


def _shard_like(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (full tensors) with each tensor that is a DTensor parameter in `model` (FSDP2) cut into the same
    shards, since load_state_dict cannot copy a plain tensor into a DTensor. A collective: call on every rank."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    parameters = dict(model.named_parameters())
    sharded = {}
    for name, tensor in state.items():
        target = parameters[name]
        if isinstance(target, DTensor):
            tensor = distribute_tensor(tensor.to(target.device, target.dtype), target.device_mesh, target.placements)
        sharded[name] = tensor
    return sharded


# Trainer writes trainer_state.json last (after model, optimizer, scheduler and RNG state, whatever their layout:
# DDP's optimizer.pt, FSDP's optimizer_0/, DeepSpeed's global_step*/), so its presence marks a complete checkpoint
CHECKPOINT_FILES = (ADAPTER_WEIGHTS_NAME, "trainer_state.json")


def last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The newest checkpoint-N under `checkpoints` holding every file a resume needs (trainer_state.json is
    written last). Newer, incomplete ones (a run killed while saving) are removed by the main process."""
    import shutil

    if not checkpoints.is_dir():
        return None
    found = sorted((int(p.name.split("-")[1]), p) for p in checkpoints.glob("checkpoint-*")
                   if p.name.split("-")[1].isdigit())
    for _, path in reversed(found):
        if all((path / name).is_file() for name in CHECKPOINT_FILES):
            return str(path)
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(path, ignore_errors=True)
    return None


class NonFiniteLoss(Exception):
    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


def _adapt(model: nn.Module, config: FinetuneConfig, targets: list[str]) -> tuple[nn.Module, SPPConfig | None]:
    """Attach the adapters in place (SPP) or wrap the model (LoRA); everything else is frozen."""
    if config.method == "spp":
        spp_config = config.spp_config(targets)
        inject_spp(model, targets, spp_config)
        return model, spp_config
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.dropout,
                      target_modules=list(targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), None


def run_finetune(model: nn.Module, tokenizer, records: list[dict], config: FinetuneConfig,
                 work_dir: str | os.PathLike, *, target_names: list[str],
                 callbacks: list | None = None) -> FinetuneResult:
    """Fine-tune `model` on `records` with SPP (or LoRA) adapters on `target_names`.

    The model is modified in place (SPP layers injected; for LoRA it is wrapped, see result.model). Trainer
    checkpoints go to work_dir/checkpoints; an existing checkpoint there is resumed from. Raises BadInput on bad
    options or data, RuntimeFailure on a NaN/inf loss (the last good checkpoint is kept). `callbacks` are extra
    transformers TrainerCallbacks (e.g. the CLI's progress display); the library itself prints nothing.
    """
    from transformers import PrinterCallback, TrainingArguments, set_seed

    world = world_size()
    config.validate(world)
    if not target_names:
        raise BadInput("no target layers to adapt: prune the model first, or name the linear layers to adapt")
    examples = build_examples(tokenizer, records, config.seqlen, config.mask_prompt)
    train_set, val_set = split_examples(examples, config.val_size, config.seed)

    set_seed(config.seed)  # the α initialisation is random: same seed, same start
    if hasattr(model, "config"):
        model.config.use_cache = False
    model, spp_config = _adapt(model, config, target_names)

    on_cuda = _uses_cuda(config.device)
    checkpoints = Path(work_dir) / "checkpoints"
    eval_steps = config.eval_steps or config.save_steps
    args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=config.micro_batch_size,
        per_device_eval_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation(world),
        max_steps=config.max_steps if config.max_steps is not None else -1,
        num_train_epochs=config.epochs,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,  # < 1: a fraction of the total steps
        lr_scheduler_type=config.lr_scheduler,
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if val_set else "no",
        eval_steps=eval_steps if val_set else None,
        seed=config.seed,
        report_to=[] if config.report_to == "none" else [config.report_to],
        use_cpu=not on_cuda,
        activation_checkpointing=config.gradient_checkpointing,  # non-reentrant: works with a frozen embedding
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        **_precision_flags(config, on_cuda),
    )

    trainer = _make_trainer_class()(
        model=model, args=args, train_dataset=train_set, eval_dataset=val_set or None,
        data_collator=PaddingCollator(pad_token_id(tokenizer)), callbacks=list(callbacks or []),
    )
    trainer.remove_callback(PrinterCallback)  # no print in library code; the loss curve is in the result
    if config.loss_normalization == "micro_batch":
        # without loss kwargs the Trainer neither counts the step's tokens (num_items_in_batch) nor passes them
        # to the model: each micro-batch's loss is its own token mean, divided by the accumulation steps, and
        # DDP averages the ranks' gradients -- transformers 4.28's arithmetic, which SPP's finetune.py ran
        trainer.model_accepts_loss_kwargs = False
    resume = last_complete_checkpoint(checkpoints)
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume)
    except NonFiniteLoss as stop:
        last = last_complete_checkpoint(checkpoints)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise RuntimeFailure(f"training loss became NaN/inf at step {stop.step}: {kept}; lower --lr "
                             f"(now {config.lr}) or check the data, then rerun to resume") from None
    eval_loss = trainer.evaluate()["eval_loss"] if val_set else None
    seconds = time.perf_counter() - start

    # from trainer.state.log_history, which a resumed run restores, so the curve covers the whole training
    curve = [{"step": e["step"], "loss": e["loss"], "lr": e.get("learning_rate")}
             for e in trainer.state.log_history if "loss" in e]
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    adapter_state = _gather_trainable(trainer, trained)
    if trainer.is_deepspeed_enabled:  # else rank 0's later from_pretrained of the parent runs under zero.Init and
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # waits on the finished ranks

        unset_hf_deepspeed_config()
    return FinetuneResult(
        model=trained, method=config.method, train_curve=curve, eval_loss=eval_loss, seconds=seconds,
        steps=trainer.state.global_step, resumed_from=resume,
        trainable_params=sum(p.numel() for p in trained.parameters() if p.requires_grad),
        targets=list(target_names), spp_config=spp_config, adapter_state=adapter_state,
        dense_after_merge=config.method == "lora",
        is_main_process=trainer.args.should_save, config=asdict(config), parallelism=_parallelism(trainer),
    )


def _parallelism(trainer) -> str:
    """The data parallelism the Trainer actually runs, read from accelerate's state rather than from the launch
    config: accelerate 1.16 on CPU keeps DistributedType.MULTI_CPU and drops an FSDP config, i.e. runs DDP."""
    if trainer.is_deepspeed_enabled:
        return "deepspeed"
    if trainer.is_fsdp_enabled:
        return f"fsdp{trainer.accelerator.state.fsdp_plugin.fsdp_version}"
    return "ddp" if trainer.args.world_size > 1 else "single"


def _gather_trainable(trainer, model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters (a collective under ZeRO-3 / FSDP2: call on every rank)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if trainer.is_deepspeed_enabled:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {name: p.detach().cpu().clone() for name, p in named}
    state = {}
    for name, parameter in named:
        tensor = parameter.detach()
        if hasattr(tensor, "full_tensor"):  # FSDP2 shards parameters as DTensors
            tensor = tensor.full_tensor()
        state[name] = tensor.cpu().clone()
    return state


def adapted_copy(base_model: nn.Module, result: FinetuneResult) -> nn.Module:
    """The trained adapters put on `base_model`, a fresh copy of the frozen base (e.g. the parent checkpoint
    loaded on rank 0, on CPU). This is how to merge after FSDP / ZeRO-3, where result.model holds shards only:
    the base is frozen, so the parent's weights are the full weights."""
    if result.method == "spp":
        inject_spp(base_model, result.targets, result.spp_config)
        model = base_model
    else:
        model, _ = _adapt(base_model, FinetuneConfig(**result.config), result.targets)
    missing = set(result.adapter_state) - {name for name, _ in model.named_parameters()}
    if missing:
        raise BadInput(f"the base model lacks adapter parameters such as {sorted(missing)[0]}: use the same base")
    model.load_state_dict(result.adapter_state, strict=False)
    return model


def merge_trained(result: FinetuneResult) -> nn.Module:
    """The plain model with the adapters merged: SPP keeps every zero; LoRA's merge_and_unload makes the
    targets dense. Call on the main process only (full weights)."""
    if result.method == "spp":
        merge_spp(result.model)
        return result.model
    return result.model.merge_and_unload()


def save_trained_adapter(result: FinetuneResult, adapter_dir: str | os.PathLike, *, base_path: str,
                         base_manifest_sha256: str | None) -> None:
    """Write the adapter (before merging): SPP's layout for SPP, PEFT's save_pretrained for LoRA."""
    if result.method == "spp":
        save_spp_adapter(result.model, adapter_dir, result.spp_config, base_path=base_path,
                         base_manifest_sha256=base_manifest_sha256)
    else:
        result.model.save_pretrained(str(adapter_dir))

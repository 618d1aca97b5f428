"""Fine-tuning on transformers' Trainer for every recovery method, so accelerate's DDP / FSDP / DeepSpeed come free.

    adapter = adapter_class(options.method).from_options(options)        # done inside run_finetune
    result = run_finetune(model, tokenizer, records, FinetuneStage(data=..., max_steps=200), work_dir,
                          target_names=names)
    merged = merge_trained(result)            # result.adapter.keeps_zeros: same zeros; lora: dense

The options object is the recipe schema's FinetuneStage (spp_cli/recipe/finetune_schema.py); None for lr and the
method-specific options means the method's default (spp_cli/adapters/__init__.py). The engine never asks which
method it runs: the adapter injects, names its trainable parameters, acts after each optimizer step and merges.
Defaults besides the method's are SPP's (spec/spp-method.md §2): AdamW, weight decay 0.001, linear schedule with
3% warm-up, global batch 128 = micro × accumulation × world size, seqlen 512, 3 epochs, seed 42. Trainer
checkpoints hold the trainable parameters only (adapter_model.safetensors) plus optimizer, scheduler, RNG and
trainer state, so they stay small (masked-full: the target weights) and resume exactly: rerunning with the same
work_dir continues from work_dir/checkpoints' last one.

Multi-GPU: launch the same program with `torchrun` or `accelerate launch --config_file recipes/launch/...`; every
rank runs run_finetune, and only the main process (result.is_main_process) should merge and save, on the full
weights (under FSDP / ZeRO-3 the Trainer gathers them into result.model at the end of training).

The result and what is done with it after training (FinetuneResult, adapted_copy / adapted_weightless,
merge_trained, save_trained_adapter) are training/result.py; they stay importable from here.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from spp_cli.adapters import adapter_class, method_named
from spp_cli.adapters.base import Adapter
from spp_cli.data.examples import PaddingCollator, build_examples, pad_token_id
from spp_cli.errors import BadInput, RuntimeFailure
from spp_cli.training.adapter_trainer import NonFiniteLoss, adapter_trainer_class, last_complete_checkpoint
from spp_cli.training.result import (
    FinetuneResult,
    adapted_copy,
    adapted_weightless,
    merge_trained,
    save_trained_adapter,
    trained_result,
)
from spp_cli.training.run_record import applied_options, peak_memory, training_state_bytes

__all__ = ["SAVE_TOTAL_LIMIT", "TRAINING_CONSTANTS", "FinetuneResult", "adapted_copy", "adapted_weightless",
           "check_options", "final_eval_loss", "gradient_accumulation", "learning_rate", "merge_trained",
           "resolved_precision", "run_finetune", "save_trained_adapter", "split_examples", "training_arguments",
           "training_device", "world_size"]

# fixed training choices (not user options), recorded in the fingerprint because they decide the result
TRAINING_CONSTANTS = {"lr_scheduler": "linear", "max_grad_norm": 1.0}
SAVE_TOTAL_LIMIT = 2  # Trainer checkpoints kept for resume
# How a step's loss is averaged (docs/fidelity.md): "batch" = transformers 5.x's default, the mean over every
# target token of the optimizer step (all micro-batches, all devices); "micro_batch" = SPP's reference
# (transformers 4.28): each micro-batch's own token mean, averaged over accumulation steps and devices.


def learning_rate(options) -> float:
    """options.lr, or the method's published default."""
    return options.lr if options.lr is not None else method_named(options.method).default_lr


def gradient_accumulation(options, world_size: int) -> int:
    """Accumulation steps so that micro × accumulation × world = batch_size (BadInput otherwise)."""
    per_step = options.micro_batch_size * world_size
    if options.batch_size % per_step != 0:
        raise BadInput(f"--batch-size {options.batch_size} is not divisible by --micro-batch-size "
                       f"{options.micro_batch_size} x {world_size} processes: use a multiple of {per_step}")
    return options.batch_size // per_step


def check_options(options, world_size: int = 1) -> Adapter:
    """What the schema (FinetuneStage's ranges and choices, via recipe.validate_options) cannot check; returns the
    (not yet injected) adapter. Left: the global batch split over this run's `world_size` processes and the method's
    own rules (adapter.validate: SPP's fused forward needs dropout 0). What needs the loaded model (out_features
    against the groups) is refused when the adapter is injected."""
    gradient_accumulation(options, world_size)
    adapter = adapter_class(options.method).from_options(options)
    adapter.validate()
    return adapter


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _destroy_process_group() -> None:
    """Destroy the process group the Trainer's arguments started (run_finetune registers this to run at exit).

    Left alive, gloo's worker threads are torn down during finalization and can abort the process ("terminate
    called without an active exception", SIGABRT), which torchrun reports as a failed rank after a finished run.
    Nothing runs collectives after run_finetune (rank 0 merges and saves alone), so exit is the place."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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


def training_device(device: str | None) -> str:
    """One rule for every stage: environment.resolve_device ("auto" -> cuda when visible, else cpu)."""
    from spp_cli.environment import resolve_device

    return resolve_device(device)


def resolved_precision(dtype: str | None, device: str) -> str:
    """What training runs in: "float32", "autocast(bfloat16)" or "autocast(float16)" (autocast on CUDA only)."""
    dtype = dtype or "auto"
    on_cuda = device.startswith("cuda")
    if dtype == "float32" or not on_cuda:
        if dtype in ("bfloat16", "float16") and not on_cuda:
            raise BadInput(f"--dtype {dtype} training needs a CUDA GPU: use --dtype float32 (or auto) on {device}")
        return "float32"
    if dtype == "bfloat16" or (dtype == "auto" and torch.cuda.is_bf16_supported()):
        return "autocast(bfloat16)"
    return "autocast(float16)"


def _precision_flags(precision: str) -> dict:
    return {"autocast(bfloat16)": {"bf16": True}, "autocast(float16)": {"fp16": True}}.get(precision, {})


def _training_callbacks(adapter: Adapter, model: nn.Module, memory: dict) -> list:
    """The adapter's hook after every optimizer step, and (once) the size of the training state on a CPU."""
    from transformers import TrainerCallback

    class AfterOptimizerStep(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            adapter.after_optimizer_step(model)
            if "bytes" not in memory and optimizer is not None:
                memory["bytes"] = training_state_bytes(model, optimizer)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True  # the last step's loss is always in the curve (and on the console)

    class InterruptAtStepEnd(TrainerCallback):
        """Ctrl-C raises KeyboardInterrupt where it lands; one landing inside a __del__ or weakref callback is
        printed and dropped by Python, and training would run on to the end. The flag re-raises it at the step's
        end (tests/test_faults.py's ctrl-c case caught such a run exiting 0)."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.interrupted = False
            if threading.current_thread() is threading.main_thread():
                self.previous = signal.getsignal(signal.SIGINT)
                signal.signal(signal.SIGINT, self._on_sigint)

        def _on_sigint(self, signum, frame):
            self.interrupted = True
            raise KeyboardInterrupt

        def on_step_end(self, args, state, control, **kwargs):
            if self.interrupted:
                raise KeyboardInterrupt

        def on_train_end(self, args, state, control, **kwargs):
            if getattr(self, "previous", None) is not None:
                signal.signal(signal.SIGINT, self.previous)

    return [AfterOptimizerStep(), InterruptAtStepEnd()]


def run_finetune(model: nn.Module, tokenizer, records: list[dict], options, work_dir: str | os.PathLike, *,
                 target_names: list[str], callbacks: list | None = None, objective=None,
                 on_curve_point: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune `model` on `records` with options.method's adapter on `target_names`.

    `options` is a FinetuneStage (spp_cli/recipe/finetune_schema.py). The model is modified in place (adapters
    injected; a PEFT method wraps it, see result.model). Trainer checkpoints go to work_dir/checkpoints; an
    existing checkpoint there is resumed from. Raises BadInput on bad options or data, RuntimeFailure on a
    NaN/inf loss (the last good checkpoint is kept). `callbacks` are extra transformers TrainerCallbacks (e.g.
    the stage's progress events); the library itself prints nothing. `objective`: None trains on the data's
    cross-entropy (SFT); a training.distill.Distillation adds the teacher's KL. With options.eval_steps the result's
    curve holds the held-out loss (and eval_ppl_source's ppl) along training (training/curve.py), each point also
    said through `on_curve_point(text)` on the main process.
    """
    from transformers import set_seed

    from spp_cli.training.curve import curve_points, recovery_curve

    world = world_size()
    adapter = check_options(options, world)
    if not target_names:
        raise BadInput("no target layers to adapt: prune the model first, or name the linear layers to adapt")
    device = training_device(options.device)
    precision = resolved_precision(options.dtype, device)
    applied = applied_options(options, model, tokenizer, records, device=device, precision=precision,
                              lr=learning_rate(options))
    examples = build_examples(tokenizer, records, options.seqlen, options.mask_prompt)
    train_set, val_set = split_examples(examples, options.val_size, options.seed)
    curve = recovery_curve(options, tokenizer, bool(val_set), on_curve_point)  # None without eval_steps

    set_seed(options.seed)  # adapter initialisations are random: same seed, same start
    if hasattr(model, "config"):
        model.config.use_cache = False
    model = adapter.inject(model, list(target_names))

    checkpoints = Path(work_dir) / "checkpoints"
    resume = last_complete_checkpoint(checkpoints)
    args = training_arguments(options, checkpoints, device, precision, world, evaluate=bool(val_set),
                              resuming=resume is not None)
    memory: dict = {}  # the training state's size on a CPU, measured at the first optimizer step
    callbacks = [*(callbacks or []), *([curve] if curve else [])]
    trainer = _adapter_trainer(model, args, adapter, tokenizer, train_set, val_set, memory, callbacks, options)
    trainer.objective = objective
    on_cuda = device.startswith("cuda")
    seconds, eval_loss = _train(trainer, resume, checkpoints, learning_rate(options), bool(val_set), on_cuda)
    result = trained_result(trainer, adapter, target_names, resume, seconds, eval_loss,
                            peak_memory(on_cuda, memory))
    if curve is not None:
        result = dataclasses.replace(result, curve=curve_points(trainer.state.log_history),
                                     curve_ppl=curve.probe[1] if curve.probe else None)
    return dataclasses.replace(result, applied=applied)


def training_arguments(options, checkpoints: Path, device: str, precision: str, world: int, *, evaluate: bool,
                       resuming: bool = False):
    """transformers' TrainingArguments for a FinetuneStage: the schedule, logging, checkpoints and precision
    (with options.eval_steps, the recovery curve's evaluations: training/curve.py)."""
    from transformers import TrainingArguments

    from spp_cli.training.compat import checkpointing_arguments
    from spp_cli.training.curve import curve_arguments

    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=options.micro_batch_size,
        per_device_eval_batch_size=options.micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation(options, world),
        max_steps=options.max_steps if options.max_steps is not None else -1,
        num_train_epochs=options.epochs,
        learning_rate=learning_rate(options),
        weight_decay=options.weight_decay,
        warmup_steps=options.warmup_ratio,  # < 1: a fraction of the total steps
        lr_scheduler_type=TRAINING_CONSTANTS["lr_scheduler"],
        max_grad_norm=TRAINING_CONSTANTS["max_grad_norm"],
        optim="adamw_torch",
        # a logged loss is the mean since the previous log, and a resumed run restarts that mean at its checkpoint:
        # logging on every checkpoint step too keeps a resumed run's curve (and manifest) the uninterrupted one's
        logging_steps=math.gcd(options.logging_steps, options.save_steps),
        logging_first_step=True,
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=SAVE_TOTAL_LIMIT,
        eval_strategy="steps" if evaluate else "no",
        **(curve_arguments(options, resuming=resuming) if evaluate else {}),
        seed=options.seed,
        report_to=[] if options.report_to == "none" else [options.report_to],
        use_cpu=device == "cpu",
        **checkpointing_arguments(options.gradient_checkpointing),
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        **_precision_flags(precision),
    )


def _adapter_trainer(model: nn.Module, args, adapter: Adapter, tokenizer, train_set: list[dict],
                     val_set: list[dict], memory: dict, callbacks: list | None, options):
    """The AdapterTrainer (spp_cli/training/adapter_trainer.py) with the adapter's hooks, silent, torn down at exit."""
    from transformers import PrinterCallback

    trainer = adapter_trainer_class()(
        model=model, args=args, train_dataset=train_set, eval_dataset=val_set or None,
        data_collator=PaddingCollator(pad_token_id(tokenizer)),
        callbacks=[*_training_callbacks(adapter, model, memory), *(callbacks or [])],
    )
    trainer.remove_callback(PrinterCallback)  # no print in library code; the loss curve is in the result
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.unregister(_destroy_process_group)  # once per process, however many runs
        atexit.register(_destroy_process_group)
    if options.loss_normalization == "micro_batch":
        # without loss kwargs the Trainer neither counts the step's tokens (num_items_in_batch) nor passes them
        # to the model: each micro-batch's loss is its own token mean, divided by the accumulation steps, and
        # DDP averages the ranks' gradients -- transformers 4.28's arithmetic, which SPP's finetune.py ran
        trainer.model_accepts_loss_kwargs = False
    return trainer


def _train(trainer, resume: str | None, checkpoints: Path, lr: float, evaluate: bool,
           on_cuda: bool) -> tuple[float, float | None]:
    """Train (from `resume` if given), then the held-out loss: (seconds, eval_loss or None), where seconds is
    the time of training and of every held-out evaluation (trainer.evaluation_seconds of it). A non-finite loss
    is a RuntimeFailure naming the last good checkpoint."""
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume)
    except NonFiniteLoss as stop:
        last = last_complete_checkpoint(checkpoints)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise RuntimeFailure(f"training loss became NaN/inf at step {stop.step}: {kept}; lower --lr "
                             f"(now {lr}) or check the data, then rerun to resume") from None
    eval_loss = final_eval_loss(trainer) if evaluate else None
    return time.perf_counter() - start, eval_loss


def final_eval_loss(trainer) -> float:
    """The held-out loss of the trained model: the evaluation the Trainer ran at the last step (eval_strategy
    "steps" evaluates there), else a new one."""
    history = trainer.state.log_history
    last = next((entry for entry in reversed(history) if "eval_loss" in entry), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return last["eval_loss"]
    return trainer.evaluate()["eval_loss"]

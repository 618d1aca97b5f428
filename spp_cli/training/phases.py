"""What a fine-tune does between its step lines, said as "note" texts (the stage sends them as events): a resume
of an interrupted run, the start of training once the model is loaded and the data tokenized, and the held-out
evaluation after the last step, which takes as long as dozens of steps and printed nothing before; and the held-out
evaluations' own progress, batch by batch (HeldOutProgress)."""

from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from spp_cli.training.adapter_trainer import last_complete_checkpoint


def resume_note(checkpoints: Path) -> str | None:
    """"resuming from step N (checkpoint PATH)" when `checkpoints` holds a complete Trainer checkpoint that
    run_finetune will resume from, else None."""
    last = last_complete_checkpoint(checkpoints)
    if last is None:
        return None
    return f"resuming from step {int(Path(last).name.split('-')[1])} (checkpoint {last})"


class PhaseNotes(TrainerCallback):
    """Calls `on_note(text)` on the main process when training starts and before the held-out evaluation that
    follows the last step."""

    def __init__(self, on_note: Callable[[str], None]):
        self.on_note = on_note

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if state.global_step:
            self.on_note(f"training: steps {state.global_step + 1}-{state.max_steps} of {state.max_steps}")
            return
        examples = f" on {len(train_dataloader.dataset)} examples" if train_dataloader is not None else ""
        self.on_note(f"training: {state.max_steps} steps{examples}")

    def on_train_end(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and args.eval_strategy != "no":
            examples = f" on {len(eval_dataloader.dataset)} examples" if eval_dataloader is not None else ""
            self.on_note(f"held-out loss: evaluating{examples} after the last step")


class HeldOutProgress(TrainerCallback):
    """Calls `on_progress({"done", "total", "label"})` (a "progress" event's payload) on the main process after each
    batch of a held-out evaluation (during training and after the last step): done of total batches, label
    "held-out loss after step N"."""

    def __init__(self, on_progress: Callable[[dict], None]):
        self.on_progress = on_progress
        self.done = 0

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        self.done += 1
        total = len(eval_dataloader) if hasattr(eval_dataloader, "__len__") else None
        if state.is_world_process_zero and total:
            label = f"held-out loss after step {state.global_step}"
            self.on_progress({"done": self.done, "total": total, "label": label})

    def on_evaluate(self, args, state, control, **kwargs):
        self.done = 0  # the next evaluation counts from its first batch

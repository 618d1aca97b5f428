"""Progress of a fine-tune as events, for the console to draw: the Trainer's own bars are off (they would mix
with spp's lines and break `--format json` logs), so this callback reports step k/N, loss, learning rate,
tokens per second and the time left through a plain function. The library prints nothing itself."""

import time
from collections.abc import Callable

from transformers import TrainerCallback


class TrainingProgress(TrainerCallback):
    """Calls `on_update({"step", "total", "loss", "lr", "tokens_per_second", "eta_seconds", "resumed_from"})`
    after every optimizer step on the main process. `loss` is the Trainer's mean train loss over the steps since
    its previous log (None between logs); `lr` the learning rate of the next step; `tokens_per_step` the global
    batch × seqlen (an upper bound: padding counts)."""

    def __init__(self, on_update: Callable[[dict], None], tokens_per_step: int):
        self.on_update = on_update
        self.tokens_per_step = tokens_per_step
        self.loss: float | None = None
        self.started: float | None = None
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.perf_counter(), state.global_step  # > 0 when resumed

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.loss = (logs or {}).get("loss", self.loss)

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        if not state.is_world_process_zero:
            return
        done = state.global_step - self.first_step
        seconds = time.perf_counter() - self.started
        per_step = seconds / done if done else None
        self.on_update({
            "step": state.global_step,
            "total": state.max_steps,
            "loss": self.loss,
            "lr": lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else None,
            "tokens_per_second": self.tokens_per_step / per_step if per_step else None,
            "eta_seconds": per_step * (state.max_steps - state.global_step) if per_step else None,
            "resumed_from": self.first_step or None,
        })
        self.loss = None

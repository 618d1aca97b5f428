"""Progress of a fine-tune as events, for the console to draw: the Trainer's own bars are off (they would mix
with spp's lines and break `--format json` logs), so this callback reports step k/N, loss, learning rate,
tokens per second and the time left through a plain function. The library prints nothing itself."""

import time
from collections.abc import Callable

from transformers import TrainerCallback


class TrainingProgress(TrainerCallback):
    """Calls `on_update({"step", "total", "loss", "lr", "tokens_per_second", "eta_seconds", "resumed_from"})`
    once per optimizer step on the main process, with the numbers spp.json's loss_curve records for that step:
    `loss` the Trainer's mean train loss since its previous log (None on a step that logs nothing; the last step
    always logs), `lr` the learning rate the step ran at. A step that logs is reported once its log is written,
    any other at its end. Rates and the time left count training time only (not the held-out evaluations and
    checkpoint saves between steps); `tokens_per_step` is the global batch × seqlen (an upper bound: padding
    counts)."""

    def __init__(self, on_update: Callable[[dict], None], tokens_per_step: int):
        self.on_update = on_update
        self.tokens_per_step = tokens_per_step
        self.training_seconds = 0.0
        self.mark: float | None = None  # when training last resumed (after a step, an evaluation or a save)
        self.first_step = 0
        self.lr: float | None = None
        self.pending: dict | None = None  # a logging step's update, waiting for its loss

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark, self.first_step = time.perf_counter(), state.global_step  # > 0 when resumed

    def on_optimizer_step(self, args, state, control, lr_scheduler=None, **kwargs):
        # the scheduler steps after this: its rate now is the one this step ran at (what the Trainer logs)
        self.lr = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.training_seconds += now - self.mark
        self.mark = now
        if not state.is_world_process_zero:
            return
        self._flush()
        self.pending = self._update(state)
        if not control.should_log:  # a logging step waits for on_log, which follows
            self._flush()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if self.pending is not None and "loss" in logs and self.pending["step"] == state.global_step:
            self.pending["loss"] = logs["loss"]
            self.pending["lr"] = logs.get("learning_rate", self.pending["lr"])
            self._flush()

    def on_evaluate(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()

    def _update(self, state) -> dict:
        done = state.global_step - self.first_step
        per_step = self.training_seconds / done if done else None
        return {
            "step": state.global_step,
            "total": state.max_steps,
            "loss": None,
            "lr": self.lr,
            "tokens_per_second": self.tokens_per_step / per_step if per_step else None,
            "eta_seconds": per_step * (state.max_steps - state.global_step) if per_step else None,
            "resumed_from": self.first_step or None,
        }

    def _flush(self) -> None:
        if self.pending is not None:
            update, self.pending = self.pending, None
            self.on_update(update)

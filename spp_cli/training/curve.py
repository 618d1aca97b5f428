"""Recovery against budget: the held-out loss (and, when asked, a token perplexity) scored every `eval_steps`
optimizer steps, at the start and at the last step, as points {step, train_tokens, held_out_loss[, ppl]}.

The Trainer itself evaluates the held-out split on that schedule (eval_steps, eval_on_start; `curve_arguments`);
`RecoveryCurve`, a callback, adds the perplexity on the same model right after each of those evaluations and
writes the point into the Trainer's log history, which every checkpoint saves, so a resumed run's curve is the
uninterrupted one's. Measuring must not change what is measured: an evaluation draws from the random generators
(each data loader it iterates seeds itself from torch's), which would change the dropout masks and the data order
of every later step, so RecoveryCurve puts the generators back as they were before it (asserted: the trained
weights equal those of the same run without a curve). `train_tokens` is the Trainer's count of the non-padding
input tokens seen (all processes). Without eval_steps nothing here runs: the Trainer evaluates at each
checkpoint as before and nothing is recorded.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy
import torch
from transformers import TrainerCallback

CURVE_KEY = "recovery_curve_point"  # the log-history entries that hold a point


def curve_arguments(options, *, resuming: bool) -> dict:
    """TrainingArguments for the curve's schedule: {} without options.eval_steps (evaluate at each checkpoint,
    as before), else evaluate every eval_steps (and at the last step), once before the first step (not again on a
    resume: that point is in the restored history) and count the tokens trained on."""
    if options.eval_steps is None:
        return {"eval_steps": options.save_steps}
    return {"eval_steps": options.eval_steps, "eval_on_start": not resuming,
            "include_num_input_tokens_seen": "non_padding"}


def recovery_curve(options, tokenizer, evaluate: bool, on_text: Callable[[str], None] | None = None):
    """The RecoveryCurve callback for a run (None without options.eval_steps), `on_text(line)` per point; BadInput
    when the run has no held-out example to score (`evaluate` False)."""
    if options.eval_steps is None:
        return None
    if not evaluate:
        from spp_cli.errors import BadInput

        raise BadInput(f"--eval-steps scores the held-out split, and --val-size {options.val_size} leaves no "
                       "held-out example of this data: give a larger --val-size (e.g. 16)")
    probe = perplexity_probe(options, tokenizer)
    on_point = None if on_text is None else (lambda point: on_text(point_text(point, probe and probe[1])))
    return RecoveryCurve(probe, options.micro_batch_size, on_point)


def perplexity_probe(options, tokenizer) -> tuple[torch.LongTensor, dict] | None:
    """(the token stream [1, L], its record {task, source, seqlen, windows, protocol}) of options.eval_ppl_source,
    tokenized once before training, in windows of the training seqlen; None when no source is asked."""
    if options.eval_ppl_source is None:
        return None
    from spp_cli.eval.perplexity import PROTOCOL, perplexity_stream

    stream, source = perplexity_stream(options.eval_ppl_source, tokenizer, options.seqlen, options.eval_data_dir)
    windows = min(options.eval_ppl_windows, stream.shape[1] // options.seqlen)
    return stream, {"task": options.eval_ppl_source, "source": source, "seqlen": options.seqlen, "windows": windows,
                    "protocol": PROTOCOL}


class RecoveryCurve(TrainerCallback):
    """After each held-out evaluation: the perplexity on `probe` (when given; every process runs it, since a
    sharded model's forward is a collective), the point appended to the log history, and `on_point(point)` on
    the main process (the stage's console line)."""

    def __init__(self, probe: tuple[torch.LongTensor, dict] | None, batch_size: int,
                 on_point: Callable[[dict], None] | None = None):
        self.probe = probe
        self.batch_size = batch_size
        self.on_point = on_point

    def on_train_begin(self, args, state, control, **kwargs):
        self.generators = random_generators()  # eval_on_start evaluates next

    def on_step_end(self, args, state, control, **kwargs):
        self.generators = random_generators()  # the step's evaluation (if any) comes next

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        restore_random_generators(self.generators)
        point = {"step": state.global_step, "train_tokens": state.num_input_tokens_seen,
                 "held_out_loss": (metrics or {}).get("eval_loss")}
        if self.probe is not None and model is not None:
            point["ppl"] = self._perplexity(model)
        state.log_history.append({"step": state.global_step, CURVE_KEY: point})
        if self.on_point is not None and state.is_world_process_zero:
            self.on_point(point)

    def _perplexity(self, model) -> float:
        from spp_cli.eval.perplexity import token_perplexity

        stream, record = self.probe
        was_training = model.training
        try:
            return token_perplexity(model, stream, record["seqlen"], self.batch_size,
                                    max_windows=record["windows"])["value"]
        finally:
            model.train(was_training)


def random_generators() -> dict:
    """The states of the generators training draws from: Python's, NumPy's, torch's CPU and CUDA ones."""
    states = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_generators(states: dict) -> None:
    random.setstate(states["python"])
    numpy.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def curve_points(log_history: list[dict]) -> list[dict]:
    """The points RecoveryCurve logged, in step order, one per step (a step evaluated twice keeps its first)."""
    points: dict[int, dict] = {}
    for entry in log_history:
        if CURVE_KEY in entry:
            points.setdefault(entry[CURVE_KEY]["step"], entry[CURVE_KEY])
    return [points[step] for step in sorted(points)]


def point_text(point: dict, ppl_record: dict | None) -> str:
    """One console line for a point: "curve: step 10, 2560 tokens trained: held-out loss 3.1234, ppl ..."."""
    parts = [f"held-out loss {point['held_out_loss']:.4f}" if point.get("held_out_loss") is not None else
             "no held-out loss"]
    if "ppl" in point and ppl_record is not None:
        parts.append(f"{ppl_record['task']} token ppl {point['ppl']:.4g} "
                     f"({ppl_record['windows']} windows @{ppl_record['seqlen']})")
    return f"curve: step {point['step']}, {point['train_tokens']} tokens trained: {', '.join(parts)}"

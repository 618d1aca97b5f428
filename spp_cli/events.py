"""What a stage tells its caller while it works: one interface for every stage (prune, finetune, merge, eval).

A stage takes `on_event: Listener | None` and calls `notify(on_event, Event(...))`; it never prints. Only the CLI
(spp_cli/render.py, `event_printer`) turns events into console lines, so the library stays silent when called from
Python and `--format json` keeps stdout clean.

Kinds and their payloads:
    "block"     a pruned block: pruners.reports.BlockReport
    "step"      a fine-tune optimizer step: the dict of spp_cli.training.progress.TrainingProgress
    "progress"  a share of an evaluation: {"done": int, "total": int, "label": str}
    "warning"   something the user should act on: str (printed as "spp: warning: ...")
    "note"      something the user should know, e.g. a resume: str (printed as "spp: ...")
    "stage"     `spp run` starts a stage: {"name": str, "type": str}
    "plan"      a stage starts: its memory plan, spp_cli.memory_plan.StagePlan (estimated peak CPU RAM, device memory
                and disk); a "warning" follows for each resource it may exceed
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KINDS = ("block", "step", "progress", "warning", "note", "stage", "plan")


@dataclass(frozen=True)
class Event:
    stage: str  # prune | finetune | merge | eval | run
    kind: str  # one of KINDS
    payload: Any = None


Listener = Callable[[Event], None]


def notify(listener: Listener | None, stage: str, kind: str, payload: Any = None) -> None:
    """Send one event to `listener` (nothing happens without one)."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}: use one of {', '.join(KINDS)}")
    if listener is not None:
        listener(Event(stage, kind, payload))

"""Forward pre-hooks on a block's target linears that feed their pruners' statistics (pruners/sequential.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pruners.blocks import StopForward
from pruners.masks import SparsityPattern
from pruners.reports import LayerReport

__all__ = ["LinearObserver"]


class LinearObserver:
    """Forward pre-hooks on a block's target linears: feed `add_batch`, record call order and shared inputs.

    Linears called one after another on the very same input tensor form a group and share the first one's
    statistics (`owner`). Groups are numbered in call order; only owners in an `active` group collect.
    The hooks run before their linear, so a pass can end (StopForward) without computing it: `stop_after` ends
    every pass at that linear; after `stop_when_complete()`, a pass ends as soon as every linear has had its input,
    which skips the rest of the block (the last linear, the residual) when only statistics are wanted.
    """

    def __init__(self, linears: dict[str, nn.Linear], make_pruner: Callable[[str], Any],
                 active: Callable[[int], bool] = lambda group: True, stop_after: str | None = None) -> None:
        self.make_pruner = make_pruner
        self.active = active
        self.stop_after = stop_after
        self.pruners: dict[str, Any] = {}
        self.owner: dict[str, str] = {}  # name -> name of the linear whose statistics it uses
        self.group: dict[str, int] = {}  # name -> group index, in call order
        self._groups = 0
        self._last_input: torch.Tensor | None = None
        self._last_owner: str | None = None
        self._expected = len(linears)
        self._called: dict[str, int] = {}  # calls per linear in the current pass
        self._each_once = True  # every finished pass called every linear exactly once
        self._stop_when_complete = False
        self._windows = 1  # calibration windows in the current forward (block_outputs' chunks)
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in linears.items()]

    def before_forward(self, windows: int) -> None:
        self._windows = windows

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            inp = args[0]
            shared = inp is self._last_input
            owner = self._last_owner if shared else name
            if name not in self.owner:
                self.owner[name] = owner
                self.group[name] = self.group[owner] if shared else self._new_group()
            elif self.owner[name] != owner:
                raise RuntimeError(f"{name} changed which linear it shares its input with between batches")
            if not shared:
                self._last_input, self._last_owner = inp, name
            if owner == name and self.active(self.group[name]):
                if name not in self.pruners:
                    self.pruners[name] = self.make_pruner(name)
                self._add(self.pruners[name], inp)
            self._called[name] = self._called.get(name, 0) + 1
            if name == self.stop_after or (self._stop_when_complete and len(self._called) == self._expected):
                raise StopForward
        return hook

    def _add(self, pruner: Any, inp: torch.Tensor) -> None:
        """Feed one forward's input to `pruner` one window at a time, in order, as the references do; several
        windows are converted to fp32 once (the statistics' first step, exact), and Wanda takes their norms in
        one reduction (`add_windows`)."""
        if self._windows == 1:
            pruner.add_batch(inp)
            return
        windows = inp.reshape(self._windows, -1, inp.shape[-1]).float()  # (W, T, c)
        if hasattr(pruner, "add_windows"):
            pruner.add_windows(windows)
        else:
            for window in windows.split(1):
                pruner.add_batch(window)

    def stop_when_complete(self) -> None:
        """From the next pass on, end each pass once every linear has seen its input -- but only if every pass so
        far called each linear exactly once (a linear called twice, or an expert no token was routed to, would
        otherwise lose statistics or never complete)."""
        self._stop_when_complete = self._each_once

    def _new_group(self) -> int:
        self._groups += 1
        return self._groups - 1

    def end_batch(self) -> None:
        if not self._stop_when_complete:
            self._each_once = (self._each_once and len(self._called) == self._expected
                               and all(count == 1 for count in self._called.values()))
        self._called.clear()
        self._last_input = self._last_owner = None

    def groups(self) -> list[list[str]]:
        """Names per group, groups and names in call order."""
        ordered: list[list[str]] = [[] for _ in range(self._groups)]
        for name, group in self.group.items():
            ordered[group].append(name)
        return ordered

    def prune(self, names: list[str], pattern: SparsityPattern) -> list[LayerReport]:
        """Prune `names` (owners first get their statistics shared with the rest of their group)."""
        reports = []
        for name in names:
            if name not in self.pruners:
                if name not in self.owner or self.owner[name] not in self.pruners:
                    raise RuntimeError(f"no calibration input reached {name}")
                self.pruners[name] = self.make_pruner(name)
                self.pruners[name].share_statistics(self.pruners[self.owner[name]])
        for name in names:
            reports.append(self.pruners.pop(name).prune(pattern))
        return reports

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.end_batch()

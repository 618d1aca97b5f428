"""A model's decoder blocks, and what the model feeds them (used by pruners/sequential.py).

`find_decoder_blocks` finds the ModuleList whose children are the class named in `model._no_split_modules`
(model.layers for LLaMA-likes, model.decoder.layers for OPT, ...), never assuming a path.
`capture_block_inputs` records, once per calibration batch, the hidden states entering block 0 and every keyword
argument each block receives (attention_mask, position_embeddings, position_ids, cache_position, ...), with
forward pre-hooks (with_kwargs=True). The capture runs with use_cache=False and never keeps a cache object.
Blocks other than the last are pass-throughs during the capture, so it costs one embedding pass per batch, and
the pre-hook on the last block stops the forward with an exception. Keyword arguments are recorded for every
block because hybrid models pass per-block values (Gemma2 and Qwen2 give sliding-window blocks their own mask).
`block_outputs` replays them through one block.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pruners.errors import PrunerOptionError, UnsupportedModelError
from pruners.experts import block_expert_linears, is_router

_CACHE_KEYS = frozenset({"cache", "past_key_value", "past_key_values", "layer_past"})


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (capture, true-sequential partial passes)."""


# ---------------------------------------------------------------------------------------------------------------
# finding blocks and linears


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (name, blocks): the ModuleList whose children are all of a class in `model._no_split_modules`.

    With several such lists the longest one wins. Raises UnsupportedModelError when there is none.
    """
    wanted = set(getattr(model, "_no_split_modules", None) or ())
    found = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
        and all(type(child).__name__ in wanted for child in module)
    ]
    if not found:
        declared = ", ".join(sorted(wanted)) if wanted else "<nothing: _no_split_modules is empty>"
        raise UnsupportedModelError(
            f"no decoder blocks found: {type(model).__name__} has no ModuleList of {declared} "
            "(the decoder-layer class its _no_split_modules names); use a Hugging Face causal LM"
        )
    return max(found, key=lambda item: len(item[1]))


def _compile(regex: str | None, option: str) -> re.Pattern | None:
    if regex is None:
        return None
    try:
        return re.compile(regex)
    except re.error as error:
        raise PrunerOptionError(f"{option} {regex!r} is not a valid regular expression ({error})") from None


def prunable_linears(model: nn.Module, targets: str | None = None, ignore: str | None = None
                     ) -> dict[str, nn.Linear]:
    """Full module name -> nn.Linear for every linear inside the decoder blocks, in module order.

    `targets` keeps only names matching it, `ignore` drops names matching it (re.search on the full name).
    Embeddings and lm_head live outside the blocks, so they are never returned. Mixture-of-experts blocks
    (pruners/experts.py) add one ExpertLinear per expert projection; their routers count only when `targets`
    is given and matches them.
    """
    prefix, blocks = find_decoder_blocks(model)
    keep, drop = _compile(targets, "--targets"), _compile(ignore, "--ignore")
    found = {}
    for index, block in enumerate(blocks):
        modules = dict(block.named_modules())
        for sub_name, module in modules.items():
            name = f"{prefix}.{index}.{sub_name}"
            parent = modules.get(sub_name.rsplit(".", 1)[0] if "." in sub_name else "")
            if (isinstance(module, nn.Linear) and (keep is None or keep.search(name))
                    and (drop is None or not drop.search(name)) and not (keep is None and is_router(name, parent))):
                found[name] = module
        found.update(block_expert_linears(block, f"{prefix}.{index}", keep, drop))
    return found


# ---------------------------------------------------------------------------------------------------------------
# capturing what the model passes to its blocks


def _is_cache(value: Any) -> bool:
    return any(cls.__name__.endswith("Cache") for cls in type(value).__mro__)


class _ValuePool:
    """Moves captured keyword values to the compute device once, reusing equal tensors across batches/blocks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._by_key: dict[str, list[torch.Tensor]] = {}
        self._this_forward: dict[int, Any] = {}  # id -> interned value, valid while the forward holds them

    def new_forward(self) -> None:
        self._this_forward.clear()

    def intern(self, key: str, value: Any) -> Any:
        if id(value) in self._this_forward:
            return self._this_forward[id(value)][1]
        if isinstance(value, torch.Tensor):
            result = self._intern_tensor(key, value)
        elif isinstance(value, (tuple, list)):
            result = type(value)(self.intern(key, item) for item in value)
        elif isinstance(value, dict):
            result = {k: self.intern(f"{key}.{k}", v) for k, v in value.items()}
        else:
            return value
        self._this_forward[id(value)] = (value, result)  # keep `value` alive so its id stays unique
        return result

    def _intern_tensor(self, key: str, value: torch.Tensor) -> torch.Tensor:
        moved = value.detach().to(self.device)
        seen = self._by_key.setdefault(key, [])
        for known in seen[-4:]:
            if known.shape == moved.shape and known.dtype == moved.dtype and torch.equal(known, moved):
                return known
        seen.append(moved)
        return moved


class _Captured:
    """Block-0 inputs of every calibration sample and, per block and batch, the (args, kwargs) to replay."""

    def __init__(self, hidden: torch.Tensor, calls: list[list[tuple[tuple, dict]]]) -> None:
        self.hidden = hidden  # (nsamples, seqlen, hidden_size), on the activation device
        self.calls = calls  # calls[block][batch] = (extra positional args, keyword args) on the compute device


def _passthrough(*args: Any, **kwargs: Any) -> Any:
    return args[0] if args else kwargs["hidden_states"]


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, calibration_ids: torch.Tensor,
                         batches: list[slice], device: torch.device,
                         choose_storage: Callable[[torch.Size, torch.dtype], torch.device]) -> _Captured:
    """Run the model on each batch of `calibration_ids` far enough to record what every block receives.

    `choose_storage(shape, dtype)` picks the device that holds the captured hidden states.
    """
    last = len(blocks) - 1
    pool = _ValuePool(device)
    calls: list[list] = [[None] * len(batches) for _ in blocks]
    state: dict[str, Any] = {"batch": 0, "hidden": None}

    def make_hook(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            extra = tuple(pool.intern(f"arg{k}", value) for k, value in enumerate(args[1:]))
            kept = {key: pool.intern(key, value) for key, value in kwargs.items()
                    if key not in _CACHE_KEYS and not _is_cache(value)}
            calls[index][state["batch"]] = (extra, kept)
            if index == 0:
                if state["hidden"] is None:
                    shape = (calibration_ids.shape[0], *hidden.shape[1:])
                    state["hidden"] = torch.empty(shape, dtype=hidden.dtype, device=choose_storage(shape, hidden.dtype))
                state["hidden"][batches[state["batch"]]].copy_(hidden)
            if index == last:
                raise StopForward
        return hook

    input_device = model.get_input_embeddings().weight.device
    handles, saved_forwards = [], []
    try:
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(make_hook(index), with_kwargs=True))
            if index < last:  # skip the block's work during the capture; its pre-hook has recorded everything
                saved_forwards.append((block, block.__dict__.get("forward")))
                block.forward = _passthrough
        for batch_index, batch in enumerate(batches):
            state["batch"] = batch_index
            pool.new_forward()
            try:
                model(input_ids=calibration_ids[batch].to(input_device), use_cache=False)
            except StopForward:
                continue
            raise UnsupportedModelError(
                f"{type(model).__name__}'s forward never reached its last decoder block; it cannot be pruned "
                "block by block"
            )
    finally:
        for handle in handles:
            handle.remove()
        for block, forward in saved_forwards:
            if forward is None:
                del block.forward
            else:
                block.forward = forward
        pool.new_forward()
    return _Captured(state["hidden"], calls)


# ---------------------------------------------------------------------------------------------------------------
# replaying a block


def _same_call(a: tuple[tuple, dict], b: tuple[tuple, dict]) -> bool:
    """Whether two captured calls pass the very same values (the capture interns equal tensors to one object)."""

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return x is y
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return type(x) is type(y) and len(x) == len(y) and all(same(i, j) for i, j in zip(x, y, strict=True))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return type(x) is type(y) and x == y

    return same(a, b)


def forward_chunks(calls: list[tuple[tuple, dict]], batches: list[slice], chunk_windows: int
                   ) -> list[tuple[int, int]]:
    """(first, stop) batch indices of each forward: runs of consecutive one-window batches with the very same
    keyword arguments, at most `chunk_windows` long; every batch alone when chunk_windows is 1 or batches hold
    more than one window (their captured masks have that batch size)."""
    if chunk_windows <= 1 or any(batch.stop - batch.start != 1 for batch in batches):
        return [(i, i + 1) for i in range(len(batches))]
    chunks, first = [], 0
    for index in range(1, len(batches) + 1):
        if (index == len(batches) or index - first == chunk_windows
                or not _same_call(calls[index], calls[first])):
            chunks.append((first, index))
            first = index
    return chunks


def block_outputs(block: nn.Module, inputs: torch.Tensor, calls: list[tuple[tuple, dict]], batches: list[slice],
                   device: torch.device, after_batch: Callable[[], None] | None = None, chunk_windows: int = 1,
                   before_forward: Callable[[int], None] | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (batch slice, block output on `device`) for every batch; a batch stopped by a hook yields nothing.

    chunk_windows > 1 runs up to that many one-window batches as one forward (`forward_chunks`) and yields its
    output per batch; `before_forward(windows)` is told how many windows each forward holds, `after_batch()` is
    called after each forward.
    """
    for first, stop in forward_chunks(calls, batches, chunk_windows):
        args, kwargs = calls[first]
        rows = slice(batches[first].start, batches[stop - 1].stop)
        if before_forward is not None:
            before_forward(rows.stop - rows.start)
        try:
            out = block(inputs[rows].to(device), *args, **kwargs)
        except StopForward:
            out = None
        finally:
            if after_batch is not None:
                after_batch()
        if out is None:
            continue
        out = out[0] if isinstance(out, (tuple, list)) else out  # transformers < 5 return a tuple
        for index in range(first, stop):
            batch = batches[index]
            yield batch, out[batch.start - rows.start:batch.stop - rows.start]

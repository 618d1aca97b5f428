"""Silence lm-eval's console noise around one zero-shot run, unless the user asked for it (-v).

What lm-eval 0.4.13 writes to the console when called as a library with a model in memory, and how each is
quieted (every change is undone when the `with` block ends):
- warnings on the "lm_eval" logger (the "`pretrained` model kwarg is not of type `str`" warning, "Overwriting
  default num_fewshot ..."): the logger is raised to ERROR;
- tqdm bars in lm_eval.api.task (building contexts), lm_eval.api.model (tokenizing) and lm_eval.models.huggingface
  (requests): those modules' `tqdm` name is replaced by one that always passes disable=True;
- `datasets` bars ("Generating validation split", "Map"): datasets' own progress switch;
- "fatal: not a git repository" on stderr: simple_evaluate runs `git describe` in the current directory to put
  a git hash in its results (which spp does not use); the lookup is replaced by one returning None.
spp reports its own progress instead (engine.evaluate's on_progress): with `on_requests`, the bar over a task's
requests ("Running loglikelihood requests", one update per request) becomes calls on_requests(done, total).
"""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def _replaced(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


class _RequestCounter:
    """What lm_eval.models.huggingface gets in place of its requests bar: update(n) and close(), told onward."""

    def __init__(self, total: int, on_requests):
        self.done, self.total, self.on_requests = 0, total, on_requests
        on_requests(0, total)

    def update(self, count: int = 1) -> None:
        self.done += count
        self.on_requests(self.done, self.total)

    def close(self) -> None:
        pass


@contextlib.contextmanager
def quiet_lm_eval(verbose: bool = False, on_requests=None):
    """A context in which lm-eval and datasets print nothing but errors; a no-op when `verbose`. `on_requests(done,
    total)` hears the progress of each batch of model requests lm-eval runs (the module docstring)."""
    if verbose:
        yield
        return
    import datasets
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.evaluator
    import lm_eval.models.huggingface
    from tqdm import tqdm

    def silent_tqdm(*args, **kwargs):
        if on_requests is not None and "requests" in str(kwargs.get("desc")) and kwargs.get("total"):
            return _RequestCounter(kwargs["total"], on_requests)
        kwargs["disable"] = True
        return tqdm(*args, **kwargs)

    logger = logging.getLogger("lm_eval")
    level, bars_were_on = logger.level, datasets.is_progress_bar_enabled()
    with contextlib.ExitStack() as stack:
        for module in (lm_eval.api.task, lm_eval.api.model, lm_eval.models.huggingface):
            stack.enter_context(_replaced(module, "tqdm", silent_tqdm))
        stack.enter_context(_replaced(lm_eval.evaluator, "get_git_commit_hash", lambda: None))
        logger.setLevel(logging.ERROR)
        datasets.disable_progress_bars()
        try:
            yield
        finally:
            logger.setLevel(level)
            if bars_were_on:
                datasets.enable_progress_bars()

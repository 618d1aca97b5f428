"""What every test in tests/cuda shares: the `cuda` marker with its one-line skip, and a pruned random model.

The tests run on a GPU machine (`bash scripts/gpu_check.sh` runs `pytest -m cuda`); without a GPU each is
collected, listed by `pytest -m cuda --collect-only`, and skipped with NO_GPU.
"""

from pathlib import Path

import pytest
import torch

NO_GPU = "no CUDA GPU visible: the cuda tests run on a GPU machine (bash scripts/gpu_check.sh runs pytest -m cuda)"
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]
CALIB = {"calib": "builtin:python-docs:train", "nsamples": 8, "seqlen": 64}


def mask_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The fraction of entries whose zero-or-not agrees between two weights of the same shape."""
    return float(((a == 0) == (b == 0)).float().mean())


def pruned_checkpoint(directory: Path, pattern: str = "2:4", device: str = "cuda") -> Path:
    """A random tiny LLaMA (fp32, tests/tiny_models.py) saved and pruned by Wanda into `directory`/prune."""
    from tiny_models import save_random_model

    from spp_cli.stages.prune import prune

    model = save_random_model(directory / "dense", initializer_range=0.2)
    options = {"pattern": pattern} if pattern != "unstructured" else {"sparsity": 0.5}
    prune(str(model), directory / "prune", method="wanda", device=device, **CALIB, **options)
    return directory / "prune"

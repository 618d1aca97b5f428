"""Hashes of a weight's zero set and values, as the spp.json manifest records them (DESIGN.md, Checkpoint)."""

import hashlib

import numpy as np
import torch


def zeros_sha256(weight: torch.Tensor) -> str:
    """sha256 of the row-major boolean zero mask of `weight`, packed with numpy.packbits."""
    zero_mask = (weight.detach() == 0).cpu().contiguous().numpy()
    return hashlib.sha256(np.packbits(zero_mask.reshape(-1)).tobytes()).hexdigest()


def weight_sha256(weight: torch.Tensor) -> str:
    """sha256 of the weight's raw bytes in its own dtype (row-major)."""
    raw = weight.detach().cpu().contiguous().view(torch.uint8).numpy()
    return hashlib.sha256(raw.tobytes()).hexdigest()


def layer_record(weight: torch.Tensor) -> dict:
    """The manifest's entry for one prunable linear: shape, sparsity, zeros and weight hashes."""
    return {
        "shape": list(weight.shape),
        "sparsity": round(float((weight == 0).sum()) / weight.numel(), 6),
        "zeros_sha256": zeros_sha256(weight),
        "weight_sha256": weight_sha256(weight),
    }

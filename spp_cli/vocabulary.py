"""The words every layer shares: method, pattern, forward-variant, dtype and device names.

Torch-free, so the schema, the CLI's `--help` and the engines all read the same tuples (a test checks that the
pruner and adapter registries and the SPP layer offer exactly these).
"""

import re

from spp_cli.adapters import METHODS

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
FINETUNE_METHODS = METHODS  # the adapter registry's names (spp_cli/adapters/__init__.py, torch-free)
SPP_FORWARDS = ("auto", "naive", "recompute", "fused")  # spp_cli/adapters/spp.py documents each
DTYPES = ("auto", "float32", "bfloat16", "float16")
REPORT_TO = ("none", "tensorboard", "wandb")
DATA_FORMATS = ("auto", "alpaca", "chat", "text")  # spp_cli/data/formats.py
LOSS_NORMALIZATIONS = ("batch", "micro_batch")  # docs/fidelity.md
BOS_RULES = ("auto", "yes", "no")  # zero-shot BOS (spp_cli/eval/zeroshot.py)
# Devices spp runs on: CPUs and CUDA GPUs. Apple's mps is not offered: nothing here tests it, and the Trainer
# engine's autocast rules are written for CPU and CUDA.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(?::\d+)?")
DEVICE_TEXT = "auto, cpu, cuda or cuda:N"

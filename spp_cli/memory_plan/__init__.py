"""The memory plan: before any weights load, each stage's estimated peak CPU RAM, device memory and disk, whether
they fit this machine, and what option would make them fit (it warns; it never refuses a run).

    shape.py     a model's sizes from config.json and its safetensors headers (ModelShape)
    estimate.py  the arithmetic of each stage (StagePlan), bytes above the runtime's floor
    fit.py       the detected devices, the fit check, the one-line text
    stages.py    plans from the validated stage options, the stage-start note, `spp run --dry-run`'s plans
    tables.py    the README's 7B/13B/70B table and the benchmark's estimates

No torch at import time, so `spp --help` stays light.
"""

from spp_cli.memory_plan.estimate import StagePlan
from spp_cli.memory_plan.fit import Devices, check_fit, detect_devices, plan_text
from spp_cli.memory_plan.shape import ModelShape, model_shape, read_model_shape
from spp_cli.memory_plan.tables import shape_rows, stage_plans_for_benchmark

__all__ = ["Devices", "ModelShape", "StagePlan", "check_fit", "detect_devices", "model_shape", "plan_text",
           "read_model_shape", "shape_rows", "stage_plans_for_benchmark"]

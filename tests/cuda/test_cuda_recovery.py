"""Recovery on the GPU: every method trains under bf16 autocast and under fp16 autocast with loss scaling (the
Trainer's GradScaler), merges, and every zero-keeping method keeps every zero of its parent (the stage's own check,
then `spp verify --against`)."""

import pytest
from cuda_helpers import CUDA, pruned_checkpoint
from tiny_models import ALPACA

from spp_cli.adapters import REGISTRY
from spp_cli.stages.finetune import finetune
from spp_cli.stages.verify import verify_checkpoint

pytestmark = CUDA
TRAIN = dict(data=str(ALPACA), max_steps=3, batch_size=4, micro_batch_size=4, seqlen=64, val_size=0, device="cuda")


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    return pruned_checkpoint(tmp_path_factory.mktemp("cuda-recovery"), "2:4")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", list(REGISTRY))
def test_every_method_trains_in_half_precision_autocast_and_keeps_every_zero(parent, tmp_path, method, dtype):
    manifest = finetune(str(parent), tmp_path / "out", method=method, dtype=dtype, **TRAIN)
    assert manifest["config"]["precision"] == f"autocast({dtype})"
    losses = [point["loss"] for point in manifest["training"]["loss_curve"]]
    assert losses and all(loss == loss and loss < 1e4 for loss in losses)  # finite: the scaler skipped no NaN away
    report = verify_checkpoint(tmp_path / "out", against=parent)
    if REGISTRY[method].keeps_zeros:
        assert report["ok"] and report["lost_zeros"] == 0, report["problems"]
    else:
        assert manifest["dense"] is True

"""`spp eval` on the GPU: the token perplexity the CPU gives, within 1e-3 relative (fp32 weights; the GPU's
matmuls and softmax sum in another order, TF32 off)."""

import json

import pytest
from cuda_helpers import CUDA, pruned_checkpoint

from spp_cli.stages.evaluate import evaluate_models

pytestmark = CUDA
TASK = "ppl:builtin:python-docs:test"


@pytest.mark.parametrize("model", ["builtin:tiny-llama", "pruned"])
def test_gpu_perplexity_equals_the_cpus(tmp_path, model):
    path = str(pruned_checkpoint(tmp_path, "unstructured")) if model == "pruned" else model
    values = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        evaluate_models({"m": path}, [TASK], out, seqlen=128, limit=8, device=device, dtype="float32")
        values[device] = json.loads(out.read_text())["models"]["m"]["perplexity"][TASK]["value"]
    assert values["cuda"] == pytest.approx(values["cpu"], rel=1e-3)

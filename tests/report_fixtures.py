"""A run folder as `spp run recipes/quickstart.yaml` leaves it (spp.json of each model stage, the eval's
results.json), with the quickstart's shapes and numbers but no weights: what `spp report`'s tables and plots read."""

import json
from pathlib import Path

# the tiny model's linears per block: (name, out features, in features)
LINEARS = [("self_attn.q_proj", 128, 128), ("self_attn.k_proj", 128, 128), ("self_attn.v_proj", 128, 128),
           ("self_attn.o_proj", 128, 128), ("mlp.gate_proj", 352, 128), ("mlp.up_proj", 352, 128),
           ("mlp.down_proj", 128, 352)]
PPL_TASK = "ppl:builtin:python-docs:test"


def layer_records(sparsity: float, blocks: int = 4) -> dict:
    """Wanda's ⌊in·s⌋ zeros per row: 89/128 = 0.6953 and 246/352 = 0.6989 at s = 0.7."""
    return {f"model.layers.{block}.{name}": {"shape": [rows, columns], "sparsity": int(columns * sparsity) / columns,
                                             "zeros_sha256": "0" * 64, "weight_sha256": "0" * 64}
            for block in range(blocks) for name, rows, columns in LINEARS}


def manifest(stage: str, method: str, parent: str, sparsity: float, **extra) -> dict:
    layers = layer_records(sparsity)
    size = {name: r["shape"][0] * r["shape"][1] for name, r in layers.items()}
    overall = sum(r["sparsity"] * size[name] for name, r in layers.items()) / sum(size.values())
    return {"stage": stage, "parent": {"path": parent, "revision": None, "manifest_sha256": "0" * 64},
            "method": method, "pattern": "unstructured", "target_sparsity": sparsity, "overall_sparsity": overall,
            "layers": layers, "dense": False, "config": {}, "manifest_sha256": stage * 8, "seconds": 5.0, **extra}


def loss_curve(steps: int, every: int = 10) -> list[dict]:
    return [{"step": step, "loss": 3.0 + 2.0 / step} for step in range(every, steps + 1, every)]


def evaluation(ppl: float, sparsity: float | None, **metrics) -> dict:
    return {"perplexity": {PPL_TASK: {"value": ppl, "protocol": "token, non-overlapping windows", "seqlen": 256,
                                      "windows": 20, "source": "builtin:python-docs:test"}},
            "results": {task: {"acc,none": value, "alias": task} for task, value in metrics.items()},
            "model": {"path": "-", "sparsity": sparsity}}


def fake_run(run: Path, *, steps: int = 120, finetunes: dict[str, float] | None = None) -> Path:
    """Write the folder: dense, a Wanda 70% prune and its fine-tunes (name -> ppl; several make a recovery
    comparison, each named after its method, with 10^4, 10^5, ... trainable parameters)."""
    finetunes = finetunes or {"finetune": 85.1483}
    prune = manifest("prune", "wanda", "builtin:tiny-llama", 0.7)
    stages = {"prune": prune}
    models = {"dense": evaluation(67.034, None, boolq=0.62, piqa=0.55),
              "prune": evaluation(123.7042, prune["overall_sparsity"], boolq=0.58, piqa=0.52)}
    for index, (name, ppl) in enumerate(finetunes.items()):
        training = {"loss_curve": loss_curve(steps), "eval_loss": None, "steps": steps,
                    "trainable_params": 10 ** (4 + index)}
        stages[name] = manifest("finetune", "spp" if name == "finetune" else name, str(run / "prune"), 0.7,
                                merged=False, training=training)  # not merged: the report reads no weights
        models[name] = evaluation(ppl, prune["overall_sparsity"], boolq=0.6, piqa=0.53)
    for name, content in stages.items():
        (run / name).mkdir(parents=True, exist_ok=True)
        (run / name / "spp.json").write_text(json.dumps(content))
    (run / "eval").mkdir(parents=True, exist_ok=True)
    (run / "eval" / "results.json").write_text(json.dumps({"models": models}))
    return run

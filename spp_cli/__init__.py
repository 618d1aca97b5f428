"""spp: prune a causal LM one-shot, recover it with SPP (sparsity-preserving PEFT) or another method, evaluate it.

The Python API is what the CLI calls (each function is imported lazily, so `import spp_cli` stays fast):

    import spp_cli
    spp_cli.prune("builtin:tiny-llama", "runs/w50", method="wanda", sparsity=0.5, calib="builtin:python-docs")
    spp_cli.finetune("runs/w50", "runs/w50-spp", data="builtin:python-docs", max_steps=50)  # method="spp"
    spp_cli.evaluate({"tuned": "runs/w50-spp"}, ["ppl:builtin:python-docs:test"], "results.json", seqlen=256)
    config = spp_cli.load_spp_adapter(base_model, "runs/w50-spp/adapter")  # injects into base_model in place
"""

from importlib import import_module

_API = {
    "prune": ("spp_cli.stages.prune", "prune"),
    "finetune": ("spp_cli.stages.finetune", "finetune"),
    "merge": ("spp_cli.stages.merge", "merge_adapter"),
    "evaluate": ("spp_cli.stages.evaluate", "evaluate_models"),
    "load_spp_adapter": ("spp_cli.adapters.spp", "load_spp_adapter"),
    "run_recipe": ("spp_cli.pipeline", "run_recipe"),
    "verify": ("spp_cli.stages.verify", "verify_checkpoint"),
    "load_model": ("spp_cli.io.checkpoint", "load_model"),
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        module, attribute = _API[name]
        return getattr(import_module(module), attribute)
    raise AttributeError(f"module 'spp_cli' has no attribute {name!r}")

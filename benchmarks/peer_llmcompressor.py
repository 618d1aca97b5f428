"""One llm-compressor pruning run, for `python -m benchmarks.prune --peer llmcompressor` (runs in the PEER's venv).

It imports nothing from spp (only benchmarks.common, standard library), so it runs under llmcompressor's own
torch/transformers: `PEER_PYTHON -m benchmarks.peer_llmcompressor ...` from the repository root. The driver gives it the
same model directory, the same calibration windows (a safetensors file holding `input_ids` (nsamples, seqlen),
drawn once by spp_cli.data.sources.calibration_windows) and the same thread count as the spp run. It:

  1. loads the model with AutoModelForCausalLM.from_pretrained(dir, dtype="auto") (what `spp prune` does);
  2. wraps the windows as a pre-tokenized datasets.Dataset (column input_ids only, no attention mask, as spp
     feeds them) and calls llmcompressor.oneshot with SparseGPTModifier / WandaPruningModifier: targets = the
     decoder-block class (model._no_split_modules), so every nn.Linear inside the blocks is pruned and lm_head is
     not; sequential pipeline over the same blocks; batch size 1; no shuffling;
  3. checks that every pruned linear has the target sparsity (and N:M structure), and writes the decoder
     linears' weights to a safetensors file (the driver evaluates them in the spp venv) and a JSON result.

Timestamps are time.time() (wall clock) so the driver can put them on one axis with its spawn time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

from benchmarks.common import peak_rss_mb

STARTED = time.time()


OWL_SPARSITIES: dict[str, float] = {}  # block name -> llm-compressor's OWL sparsity, as it inferred them


def work_around_owl_bugs() -> None:
    """Two bugs make llm-compressor 0.14.0.1's sparsity_profile="owl" fail inside oneshot; patch around both,
    keeping its statistics, hooks, forward passes and formula its own:

    1. `_infer_owl_layer_sparsity` runs from the modifier's on_initialize and calls the basic pipeline, whose
       lifecycle events (calibration_start, sequential_epoch_end, calibration_end) raise ValueError("Cannot invoke
       event before initializing"): those three events are silenced while `_get_activations` runs, and only then.
    2. It returns a dict (block name -> sparsity), but on_calibration_start only unpacks a list (`case list()`), so
       every linear gets the whole dict as its sparsity (TypeError in sparsify_weight): the dict is handed back as
       a list in the order of the modifier's target blocks, the order on_calibration_start indexes it by.
    """
    from llmcompressor.core import LifecycleCallbacks
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase

    get_activations, infer = SparsityModifierBase._get_activations, SparsityModifierBase._infer_owl_layer_sparsity

    def get_activations_before_initialization(self, model, dataloader, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            for event in ("calibration_start", "sequential_epoch_end", "calibration_end"):
                stack.enter_context(_patched(LifecycleCallbacks, event, classmethod(lambda cls, *a, **k: None)))
            return get_activations(self, model, dataloader, *args, **kwargs)

    def infer_as_list(self, model, layers, dataloader):
        sparsities = infer(self, model, layers, dataloader)
        OWL_SPARSITIES.update({name: float(value) for name, value in sparsities.items()})
        return [float(sparsities[name]) for name in self._target_layers]

    SparsityModifierBase._get_activations = get_activations_before_initialization
    SparsityModifierBase._infer_owl_layer_sparsity = infer_as_list


@contextlib.contextmanager
def _patched(owner, name, value):
    saved = owner.__dict__[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def describe(args, weights: dict, calibration_shape) -> dict:
    """The run's options and the sparsity of the pruned decoder linears (name.weight -> tensor)."""
    sparsity = {name: float((weight == 0).float().mean()) for name, weight in weights.items()}
    zeros = sum(int((weight == 0).sum()) for weight in weights.values())
    total = sum(weight.numel() for weight in weights.values())
    return {
        "tool": "llmcompressor", "method": args.method, "mask_structure": args.mask_structure,
        "sparsity_target": args.sparsity, "overall_sparsity": round(zeros / total, 6),
        "min_layer_sparsity": round(min(sparsity.values()), 6), "max_layer_sparsity": round(max(sparsity.values()), 6),
        "pruned_linears": len(weights), "sparsity_profile": args.sparsity_profile,
        "owl_block_sparsity": OWL_SPARSITIES or None,  # llm-compressor's inferred OWL ratios (block name -> sparsity)
        "calibration": {"nsamples": calibration_shape[0], "seqlen": calibration_shape[1]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    parser.add_argument("--sparsity", type=float, required=True)
    parser.add_argument("--mask-structure", default="0:0", help='"0:0" (unstructured) or "N:M"')
    parser.add_argument("--calibration", required=True, help="safetensors file with input_ids (nsamples, seqlen)")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--sparsity-profile", choices=["uniform", "owl"], default="uniform",
                        help='owl: the modifier\'s sparsity_profile="owl" with owl_m and owl_lmbda')
    parser.add_argument("--owl-m", type=int, default=5, help="OWL's outlier threshold M (llm-compressor types it int)")
    parser.add_argument("--owl-lmbda", type=float, default=0.08, help="OWL's lambda")
    parser.add_argument("--weights-out", required=True, help="safetensors file for the pruned decoder linears")
    parser.add_argument("--result", required=True, help="JSON file for the timings")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import load_file, save_file

    if args.sparsity_profile == "owl":
        work_around_owl_bugs()
    imported = time.time()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").eval()
    calibration = load_file(args.calibration)["input_ids"]  # (nsamples, seqlen) int64
    nsamples, seqlen = calibration.shape
    dataset = datasets.Dataset.from_dict({"input_ids": calibration.tolist()})
    block_classes = list(model._no_split_modules)
    modifier_class = SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier
    owl = {"sparsity_profile": "owl", "owl_m": args.owl_m, "owl_lmbda": args.owl_lmbda} if (
        args.sparsity_profile == "owl") else {}
    recipe = modifier_class(sparsity=args.sparsity, mask_structure=args.mask_structure,
                            targets=block_classes, ignore=["re:.*lm_head"], **owl)
    loaded = time.time()
    model = oneshot(
        model=model, dataset=dataset, recipe=recipe, num_calibration_samples=nsamples, max_seq_length=seqlen,
        shuffle_calibration_samples=False, batch_size=1, pipeline="sequential", sequential_targets=block_classes,
    )
    pruned = time.time()

    # the decoder linears (what both tools prune), checked and saved for the driver
    blocks = [name for name, module in model.named_modules() if type(module).__name__ in block_classes]
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and any(name.startswith(block + ".") for block in blocks)}
    weights = {name + ".weight": linear.weight.detach().contiguous().clone() for name, linear in linears.items()}
    save_file(weights, args.weights_out)
    done = time.time()
    peak_mb = peak_rss_mb()  # VmHWM, not ru_maxrss: Linux carries that across exec

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    result = {**describe(args, weights, calibration.shape), "dtype": dtype, "started": STARTED,
              "imports_seconds": round(imported - STARTED, 3), "load_seconds": round(loaded - imported, 3),
              "prune_seconds": round(pruned - loaded, 3), "save_seconds": round(done - pruned, 3), "done": done,
              "peak_rss_mb": round(peak_mb, 1), "torch_threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "versions": {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__}}
    with open(args.result, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()

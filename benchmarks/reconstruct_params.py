"""`python -m benchmarks.reconstruct_params`: what block-wise reconstruction trains, compared at the same steps (JSON).

`spp prune --refine reconstruct --reconstruct-params weights | spp | masked-lora` on the shipped tiny model (Wanda
70% unstructured, the quickstart's pruning), every row with the same calibration windows, epochs, batch and seed,
so every row takes the same optimizer steps per block; rows at EBFT's lr 2e-4 and, for the two adapters, at their
own finetune lr as well (SPP 4e-3: its β starts at zero; masked LoRA 3e-4). Per row: each block's relative output
error ||Y-Ŷ||²/||Y||² before and after training (spp.json's reconstruct.block_error), the held-out perplexity on
builtin:python-docs:test, and the prune stage's wall seconds (after one untimed warm-up prune). The rows run in
turn, reversed on every other repeat (the machine is shared: the load average is recorded at the start and the
end); a row's output is the same bytes on every repeat (checked: manifest_sha256), so its perplexity is measured once.

  OMP_NUM_THREADS=1 python -m benchmarks.reconstruct_params      # about 3 minutes on a shared 2-core machine

--smoke: the masked-lora row only, 4 x 32 windows, 1 epoch, one repeat, 2 perplexity windows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import common

ROWS = {  # name -> the prune stage's reconstruct options (None: the unrefined Wanda prune)
    "wanda (no reconstruct)": None,
    "weights, lr 2e-4": {"reconstruct_params": "weights"},
    "spp, lr 2e-4": {"reconstruct_params": "spp"},
    "masked-lora, lr 2e-4": {"reconstruct_params": "masked-lora"},
    "spp, lr 4e-3": {"reconstruct_params": "spp", "reconstruct_lr": 4e-3},
    "masked-lora, lr 3e-4": {"reconstruct_params": "masked-lora", "reconstruct_lr": 3e-4},
}
SMOKE_ROWS = ["masked-lora, lr 2e-4"]
HELD_OUT = "ppl:builtin:python-docs:test"


def prune_row(options: dict | None, out: Path, args) -> tuple[dict, float]:
    """(spp.json, wall seconds) of one prune of the tiny model with a row's options."""
    from spp_cli.stages.prune import prune

    refine = {} if options is None else {"refine": "reconstruct", "reconstruct_epochs": args.epochs, **options}
    started = time.perf_counter()
    manifest = prune(common.TINY, out, method="wanda", sparsity=0.7, calib="builtin:python-docs:train",
                     nsamples=args.nsamples, seqlen=args.seqlen, device="cpu", dtype="float32",
                     **refine)
    return manifest, time.perf_counter() - started


def summary(manifest: dict) -> dict:
    """Each block's before/after error and their means (nothing for the unrefined row)."""
    errors = manifest.get("reconstruct", {}).get("block_error")
    if not errors:
        return {}
    before = [errors[block]["before"] for block in sorted(errors, key=int)]
    after = [errors[block]["after"] for block in sorted(errors, key=int)]
    return {"error_before": before, "error_after": after, "mean_error_before": statistics.fmean(before),
            "mean_error_after": statistics.fmean(after),
            "every_block_lower": all(a < b for a, b in zip(after, before, strict=True))}


def measure(args, scratch: Path) -> dict:
    from spp_cli.stages.evaluate import evaluate_models

    rows = SMOKE_ROWS if args.smoke else list(ROWS)
    results = {name: {"seconds": [], "manifest_sha256": set()} for name in rows}
    if not args.smoke:  # untimed: the first prune in a process also pays for imports and the calibration corpus
        prune_row(None, scratch / "warm-up", args)
    for repeat in range(args.repeats):
        for name in rows if repeat % 2 == 0 else list(reversed(rows)):
            out = scratch / f"row{rows.index(name)}-repeat{repeat}"  # a new folder: nothing is skipped
            manifest, seconds = prune_row(ROWS[name], out, args)
            results[name]["seconds"].append(round(seconds, 2))
            results[name]["manifest_sha256"].add(manifest["manifest_sha256"])
            results[name].update(summary(manifest))
            print(f"repeat {repeat + 1}, {name}: {seconds:.1f} s", flush=True)
    models = {name: str(scratch / f"row{index}-repeat0") for index, name in enumerate(rows)}
    scores = evaluate_models(models, [HELD_OUT], scratch / "results.json", seqlen=args.seqlen, limit=args.ppl_windows,
                             device="cpu", dtype="float32")["models"]
    for name, entry in scores.items():
        results[name]["held_out_ppl"] = entry["perplexity"][HELD_OUT]["value"]
        results[name]["same_bytes_every_repeat"] = len(results[name].pop("manifest_sha256")) == 1
        results[name]["median_seconds"] = statistics.median(results[name]["seconds"])
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5, help="reconstruct_epochs of every row (EBFT's: 10)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ppl-windows", type=int, default=32, help="held-out perplexity windows of --seqlen")
    parser.add_argument("--out", default=None, help="default benchmarks/results/reconstruct_params.json")
    parser.add_argument("--smoke", action="store_true", help="1 row, 4 x 32 windows, 1 epoch, 1 repeat, 2 ppl windows")
    args = parser.parse_args(argv)
    if args.smoke:
        args.nsamples, args.seqlen, args.epochs, args.repeats, args.ppl_windows = 4, 32, 1, 1, 2
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as scratch:
        results = measure(args, Path(scratch))
    report = {"benchmark": "refine reconstruct: weights vs spp vs masked-lora (benchmarks/reconstruct_params.py)",
              "model": common.TINY, "prune": "wanda 0.7 unstructured, float32, cpu",
              "calibration": {"source": "builtin:python-docs:train", "nsamples": args.nsamples, "seqlen": args.seqlen},
              "reconstruct": {"epochs": args.epochs, "batch_size": 8, "weight_decay": 0.1, "warmup_steps": 0,
                              "steps_per_block": args.epochs * -(-args.nsamples // 8)},
              "held_out": {"task": HELD_OUT, "windows": args.ppl_windows, "seqlen": args.seqlen},
              "repeats": args.repeats, "results": results,
              "machine": common.machine_info(loadavg_at_start=load_at_start), "created": common.timestamp()}
    common.write_json(report, args.out or common.default_out("reconstruct_params", args.smoke))


if __name__ == "__main__":
    main()

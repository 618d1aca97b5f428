"""Prune time per compute dtype on a CPU: SparseGPT and Wanda, unstructured 50% and 2:4, a random model of Gemma 3
270M's block shape, each checkpoint dtype computed in itself (today's `--dtype auto`) and in fp32.

The row that would have caught issue 23's "bf16 SparseGPT is several times slower than fp32": every method and
pattern is timed for an fp32, a bf16 and an fp16 checkpoint, computed in the checkpoint's dtype and in fp32, so the
prune stage's CPU `auto` (spp_cli/stages/prune.py, compute_dtype: fp16 -> fp32, bf16 stays) is chosen from these
numbers. Each configuration runs pruners.sequential.prune_model in this process on a fresh copy of one random model
(weights rounded to the checkpoint's dtype first, so both compute dtypes start from the same checkpoint); the
configurations alternate within each repeat (the machine is shared: `uptime`'s load is recorded before every run).
Quality beside speed: the mean block reconstruction error (pruners.hooks.ReconstructionError) and the fraction of
mask entries equal to the fp32 computation's of the same checkpoint.

  OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.prune_dtype --out benchmarks/results/prune_dtype.json
  ... --threads 1          (torch's intra-op threads; a loaded 2-CPU machine is several times faster with 1)
  ... --smoke              (1 block of hidden 64, 2 windows of 64 tokens, one repeat, one thread)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

from benchmarks import common

GEMMA3_270M_BLOCK = dict(  # Gemma 3 270M's decoder shape (../shared/models/gemma3-270m.sh); vocabulary cut: the
    # embedding is never pruned and only costs memory here
    hidden_size=640, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
    query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768, vocab_size=4096,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
)
METHODS = ("sparsegpt", "wanda")
PATTERNS = ("unstructured", "2:4")
# (checkpoint dtype, compute dtype): today's auto computes in the checkpoint's dtype; fp32 is the other choice
DTYPE_PAIRS = (("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32"),
               ("float16", "float16"), ("float16", "float32"))


SMOKE_BLOCK = dict(hidden_size=64, intermediate_size=128, head_dim=16, query_pre_attn_scalar=16)  # --smoke only


def random_gemma3(blocks: int, seed: int = 0, **shape):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(num_hidden_layers=blocks, **{**GEMMA3_270M_BLOCK, **shape})
    config.layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(blocks)]
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(config).eval()


def prune_once(base, ids, method: str, pattern: str, stored: str, compute: str) -> dict:
    """Prune a copy of `base` (rounded to `stored`, computed in `compute`); seconds, error and the masks."""
    import torch

    from pruners.masks import parse_pattern
    from pruners.options import PruneOptions
    from pruners.sequential import prune_model

    model = copy.deepcopy(base).to(getattr(torch, stored)).to(getattr(torch, compute))
    load = os.getloadavg()[0]
    blocks: list = []
    wall, cpu = time.perf_counter(), time.process_time()
    reports = prune_model(model, ids, PruneOptions(method, parse_pattern(pattern, 0.5)), on_block=blocks.append)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    masks = {r.name: model.get_submodule(r.name).weight == 0 for r in reports}
    return {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "load_before": round(load, 2),
            "block_seconds": [round(b.seconds, 3) for b in blocks],
            "reconstruction_error": statistics.fmean(b.reconstruction_error for b in blocks), "masks": masks}


def mask_agreement(masks: dict, reference: dict) -> float:
    equal = sum(int((masks[name] == reference[name]).sum()) for name in reference)
    return equal / sum(mask.numel() for mask in reference.values())


def run(args) -> list[dict]:
    import torch

    torch.set_num_threads(args.threads)
    base = random_gemma3(args.blocks, **(SMOKE_BLOCK if args.smoke else {}))
    ids = torch.randint(0, GEMMA3_270M_BLOCK["vocab_size"], (args.nsamples, args.seqlen),
                        generator=torch.Generator().manual_seed(1))
    rows = {}
    for _ in range(args.repeats):  # every configuration once per repeat: slow stretches of load hit all of them
        for method in METHODS:
            for pattern in PATTERNS:
                for stored, compute in DTYPE_PAIRS:
                    result = prune_once(base, ids, method, pattern, stored, compute)
                    rows.setdefault((method, pattern, stored, compute), []).append(result)
    return [summarize(key, runs, rows) for key, runs in rows.items()]


def summarize(key: tuple, runs: list[dict], rows: dict) -> dict:
    method, pattern, stored, compute = key
    reference = rows[(method, pattern, stored, "float32")][0]["masks"]
    return {
        "method": method, "pattern": pattern, "checkpoint_dtype": stored, "compute_dtype": compute,
        "todays_auto": compute == stored, "new_cpu_auto": compute == ("float32" if stored == "float16" else stored),
        "median_seconds": statistics.median(r["seconds"] for r in runs),
        "median_cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
        "seconds": [r["seconds"] for r in runs], "load_before": [r["load_before"] for r in runs],
        "block_seconds": [r["block_seconds"] for r in runs],
        "reconstruction_error": runs[0]["reconstruction_error"],
        "mask_agreement_with_fp32_compute": mask_agreement(runs[0]["masks"], reference),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="default benchmarks/results/prune_dtype.json")
    parser.add_argument("--smoke", action="store_true", help="1 block of hidden 64, 2 windows of 64 tokens, 1 repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.blocks, args.nsamples, args.seqlen, args.repeats, args.threads = 1, 2, 64, 1, 1
    started = time.perf_counter()
    results = run(args)
    report = {"benchmark": "prune_dtype", "created": common.timestamp(),
              "options": {k: v for k, v in vars(args).items() if k != "out"},
              "model": {"architecture": "Gemma3ForCausalLM (random)", **GEMMA3_270M_BLOCK,
                        **(SMOKE_BLOCK if args.smoke else {}), "blocks": args.blocks},
              "results": results, "seconds": round(time.perf_counter() - started, 1),
              "machine": common.machine_info(threads=args.threads)}
    common.write_json(report, args.out or common.default_out("prune_dtype", args.smoke))


if __name__ == "__main__":
    main()

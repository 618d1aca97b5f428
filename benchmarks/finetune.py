"""Benchmark: every recovery method's training-step time and peak memory against PEFT LoRA (r=8), same targets.

Variants: lora (PEFT, r 8), the SPP forwards naive / recompute / fused, and the other methods of
spp_cli/adapters at their defaults: masked-lora (r 8, dropout 0.05: the split form), masked-lora-d0 (dropout 0:
the one-GEMM fused form, as recipes/compare-recovery.yaml runs it), ia3 (PEFT), masked-full (mask re-applied
after each step). The load average is recorded before and after (on a shared machine, read ratios, not seconds).

A step is forward + backward + AdamW step on one batch (default 4 × 256 tokens). Variants run alternating, one
step each per round, and the median over rounds is reported. Peak memory is measured in a child process per
model: on CUDA with torch.cuda.max_memory_allocated; on CPU as the rise of peak RSS (VmHWM, reset through
/proc/self/clear_refs) over the resident model + optimizer during one step, with glibc told to mmap every
allocation >= 64 KiB (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave RSS at once.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.finetune --out benchmarks/results/finetune.json

--smoke: a 2-block hidden-64 model, one round of one 1 x 16 batch, every variant; the peak memory measured in this
process (no child per variant).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from benchmarks import common

VARIANTS = ("lora", "naive", "recompute", "fused", "masked-lora", "masked-lora-d0", "ia3", "masked-full")
# built through the adapter interface: variant -> (method, options other than its defaults)
ADAPTER_METHODS = {"masked-lora": ("masked-lora", {}), "masked-lora-d0": ("masked-lora", {"dropout": 0.0}),
                   "ia3": ("ia3", {}), "masked-full": ("masked-full", {})}
MODELS = {
    # name: (common.LLAMA_SHAPES shape, overrides); random init, magnitude-pruned to 50% per matrix before timing
    "small": ("h256", dict(max_position_embeddings=1024)),
    "h1024": ("h1024", dict(num_hidden_layers=4, max_position_embeddings=1024)),
    "smoke": ("h64", dict(vocab_size=256, max_position_embeddings=1024)),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_config(name: str) -> dict:
    shape, overrides = MODELS[name]
    return {**common.LLAMA_SHAPES[shape], **overrides}


def build_model(name: str, device: str) -> torch.nn.Module:
    shape, overrides = MODELS[name]
    model = common.random_llama(shape, **overrides).to(device)
    with torch.no_grad():  # 50% magnitude mask per matrix, so the adapters see a real zero set
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module_name.endswith(TARGETS):
                threshold = module.weight.abs().flatten().kthvalue(module.weight.numel() // 2).values
                module.weight[module.weight.abs() <= threshold] = 0
    return model


def adapt(base: torch.nn.Module, variant: str):
    """A fresh copy of `base` with the variant's adapter, an AdamW over its trainable parameters, and what to
    call after each optimizer step (masked-full re-applies its mask)."""
    model = copy.deepcopy(base)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TARGETS)]
    after_step = None
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets))
    elif variant in ADAPTER_METHODS:
        from spp_cli.adapters import adapter_class
        from spp_cli.recipe.schema import FinetuneStage

        method, options = ADAPTER_METHODS[variant]
        adapter = adapter_class(method).from_options(FinetuneStage(data="unused", method=method, **options))
        model = adapter.inject(model, targets)
        after_step = adapter.after_optimizer_step
    else:
        from spp_cli.adapters.spp import SPPConfig, inject_spp

        dropout = 0.0 if variant == "fused" else 0.05
        inject_spp(model, targets, SPPConfig(forward=variant, dropout=dropout))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=4e-3, weight_decay=0.001), after_step


def train_step(model, optimizer, batch, after_step=None) -> float:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    if after_step is not None:
        after_step(model)
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(name: str, variants, batch_shape, rounds: int, device: str) -> dict:
    base = build_model(name, device)
    batch = torch.randint(0, base.config.vocab_size, batch_shape, generator=torch.Generator().manual_seed(1))
    batch = batch.to(device)
    setups = {v: adapt(base, v) for v in variants}
    for setup in setups.values():  # warm-up: allocate optimizer state, first-call overheads
        train_step(*setup[:2], batch, setup[2])
    seconds = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            model, optimizer, after_step = setups[variant]
            sync(device)
            start = time.perf_counter()
            train_step(model, optimizer, batch, after_step)
            sync(device)
            seconds[variant].append(time.perf_counter() - start)
    trainable = {v: sum(p.numel() for p in setups[v][0].parameters() if p.requires_grad) for v in variants}
    return {v: {"step_seconds_median": statistics.median(s), "step_seconds": [round(x, 4) for x in s],
                "trainable_params": trainable[v]} for v, s in seconds.items()}


def peak_memory(name: str, variant: str, batch_shape, device: str) -> dict:
    """Peak memory of one step above the resident model + optimizer state (run in a fresh child)."""
    base = build_model(name, device)
    batch = torch.randint(0, base.config.vocab_size, batch_shape, generator=torch.Generator().manual_seed(1))
    batch = batch.to(device)
    model, optimizer, after_step = adapt(base, variant)
    del base
    train_step(model, optimizer, batch, after_step)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, optimizer, batch, after_step)
        torch.cuda.synchronize()
        return {"peak_step_bytes": torch.cuda.max_memory_allocated() - resident, "resident_bytes": resident,
                "method": "torch.cuda.max_memory_allocated - memory_allocated"}
    resident = common.process_status_kib("VmRSS")
    common.reset_peak_rss()  # VmHWM back to the current RSS
    train_step(model, optimizer, batch, after_step)
    return {"peak_step_bytes": int(common.process_status_kib("VmHWM") - resident) * 1024,
            "resident_bytes": int(resident) * 1024,
            "method": "VmHWM - VmRSS, MALLOC_MMAP_THRESHOLD_=65536"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="default benchmarks/results/finetune.json")
    parser.add_argument("--models", default="small,h1024", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="seconds: the hidden-64 model, one 1 x 16 step")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    return parser


def measure_model(name: str, variants: list[str], batch_shape: tuple, args) -> dict:
    """Step times of every variant on one model, then each one's peak step memory (a fresh child per variant,
    in this process with --smoke), and the ratios to LoRA."""
    timing = time_variants(name, variants, batch_shape, args.rounds, args.device)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for variant in variants:
        if args.smoke:
            timing[variant].update(peak_memory(name, variant, batch_shape, args.device))
            continue
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.finetune", "--memory-child", name, variant, "--batch",
             str(args.batch), "--seqlen", str(args.seqlen), "--device", args.device],
            capture_output=True, text=True, env=env, check=True, cwd=common.REPO)
        timing[variant].update(json.loads(child.stdout.strip().splitlines()[-1]))
    if "lora" in timing:
        lora = timing["lora"]
        for row in timing.values():
            row["step_ratio_vs_lora"] = round(row["step_seconds_median"] / lora["step_seconds_median"], 3)
            row["memory_ratio_vs_lora"] = (round(row["peak_step_bytes"] / lora["peak_step_bytes"], 3)
                                           if lora["peak_step_bytes"] > 0 else None)
    return {"config": model_config(name), "variants": timing}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.rounds, args.batch, args.seqlen = "smoke", 1, 1, 16
    batch_shape = (args.batch, args.seqlen)
    if args.memory_child:
        print(json.dumps(peak_memory(*args.memory_child, batch_shape, args.device)))
        return

    variants = args.variants.split(",")
    load_before = os.getloadavg()
    results = {name: measure_model(name, variants, batch_shape, args) for name in args.models.split(",")}

    from spp_cli.adapters.spp import FAITHFUL_DEFAULT

    report = {
        "benchmark": "every recovery method vs PEFT LoRA r=8 training step (forward+backward+AdamW), same targets, "
                     "same batch",
        "batch": list(batch_shape), "rounds": args.rounds, "device": args.device, "smoke": args.smoke,
        "dtype": "float32", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_average_1_5_15": {"before": [round(x, 2) for x in load_before],
                                "after": [round(x, 2) for x in os.getloadavg()]},
        "faithful_default": FAITHFUL_DEFAULT, "targets": {"faithful": {"step": 1.6, "memory": 1.2},
                                                          "fused": {"step": 1.3, "memory": 1.1},
                                                          "masked-lora": {"step": 1.8, "memory": 1.3},
                                                          "ia3": {"step": 1.0}},
        "models": results,
    }
    common.write_json(report, args.out or common.default_out("finetune", args.smoke))
    for name, result in results.items():
        for variant, row in result["variants"].items():
            memory_ratio = row.get("memory_ratio_vs_lora")
            print(f"{name:6s} {variant:10s} step {row['step_seconds_median']:.4f}s "
                  f"x{row.get('step_ratio_vs_lora', float('nan')):.2f}  peak {row['peak_step_bytes'] / 2**20:.1f} MiB "
                  f"x{float('nan') if memory_ratio is None else memory_ratio:.2f}")


if __name__ == "__main__":
    main()

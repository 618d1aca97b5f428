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

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_finetune.py --out bench_out/finetune.json
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("lora", "naive", "recompute", "fused", "masked-lora", "masked-lora-d0", "ia3", "masked-full")
# built through the adapter interface: variant -> (method, options other than its defaults)
ADAPTER_METHODS = {"masked-lora": ("masked-lora", {}), "masked-lora-d0": ("masked-lora", {"dropout": 0.0}),
                   "ia3": ("ia3", {}), "masked-full": ("masked-full", {})}
MODELS = {
    # name: LlamaConfig kwargs (random init, magnitude-pruned to 50% per matrix before timing)
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=2048),
    "h1024": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=32000),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(name: str, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=1024, **MODELS[name])
    model = LlamaForCausalLM(config).to(device)
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
        from spp_cli.recipe_schema import FinetuneStage

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


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


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
    resident = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    train_step(model, optimizer, batch, after_step)
    return {"peak_step_bytes": (_rss_kib("VmHWM") - resident) * 1024, "resident_bytes": resident * 1024,
            "method": "VmHWM - VmRSS, MALLOC_MMAP_THRESHOLD_=65536"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out/finetune.json")
    parser.add_argument("--models", default="small,h1024")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch_shape = (args.batch, args.seqlen)
    if args.memory_child:
        print(json.dumps(peak_memory(*args.memory_child, batch_shape, args.device)))
        return

    variants = args.variants.split(",")
    load_before = os.getloadavg()
    results = {}
    for name in args.models.split(","):
        timing = time_variants(name, variants, batch_shape, args.rounds, args.device)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        for variant in variants:
            child = subprocess.run(
                [sys.executable, __file__, "--memory-child", name, variant, "--batch", str(args.batch),
                 "--seqlen", str(args.seqlen), "--device", args.device],
                capture_output=True, text=True, env=env, check=True)
            timing[variant].update(json.loads(child.stdout.strip().splitlines()[-1]))
        if "lora" in timing:
            lora = timing["lora"]
            for row in timing.values():
                row["step_ratio_vs_lora"] = round(row["step_seconds_median"] / lora["step_seconds_median"], 3)
                row["memory_ratio_vs_lora"] = round(row["peak_step_bytes"] / lora["peak_step_bytes"], 3)
        results[name] = {"config": MODELS[name], "variants": timing}

    from spp_cli.adapters.spp import FAITHFUL_DEFAULT

    report = {
        "benchmark": "every recovery method vs PEFT LoRA r=8 training step (forward+backward+AdamW), same targets, "
                     "same batch",
        "batch": list(batch_shape), "rounds": args.rounds, "device": args.device,
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, result in results.items():
        for variant, row in result["variants"].items():
            print(f"{name:6s} {variant:10s} step {row['step_seconds_median']:.4f}s "
                  f"x{row.get('step_ratio_vs_lora', float('nan')):.2f}  peak {row['peak_step_bytes'] / 2**20:.1f} MiB "
                  f"x{row.get('memory_ratio_vs_lora', float('nan')):.2f}")


if __name__ == "__main__":
    main()

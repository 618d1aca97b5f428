"""`spp bench`: prune, recovery, merge, eval and 2:4 kernel costs measured on the user's own device, for a model or
a weightless real shape (spp_cli/bench/shapes.py), per block and extrapolated to the whole model.

    from spp_cli.bench import BenchOptions, run_bench
    result = run_bench(BenchOptions(shape="llama-7b", blocks=2, nsamples=128, seqlen=2048))

Modules: runner (options, the order of the sections), shapes, measure (timing, peak memory, the depth line),
prune, recovery (every method against PEFT LoRA r=8, and merge), inference (eval tokens/s, 2:4 semi-structured).
"""

from spp_cli.bench.runner import SECTIONS, BenchOptions, run_bench

__all__ = ["SECTIONS", "BenchOptions", "run_bench"]

"""spp's benchmarks: seconds, memory and quality against the peers, as JSON in benchmarks/results/.

Each module is one benchmark, run from the repository root (no install needed):

    python -m benchmarks.prune ...            one-shot pruning: seconds and peak RSS per method
    python -m benchmarks.prune --peer llmcompressor ...   the same pruning through llm-compressor, alternating
    python -m benchmarks.prune --memory ...   peak RSS of the prune stage against depth (= benchmarks.prune_memory)
    python -m benchmarks.finetune ...         every recovery method's training step against PEFT LoRA
    python -m benchmarks.eval ...             `spp eval` against the `lm_eval` CLI
    python -m benchmarks.matmul ...           F.linear GFLOPS per dtype and shape
    python -m benchmarks.real_model ...       a real pretrained model: spp vs llm-compressor, then recovery

Every benchmark takes `--smoke`: a few seconds on the shipped tiny model or a tiny random one, skipping peers that
are not installed (tests/benchmarks/test_smoke.py runs them all). `common.py` holds what they share (random models,
peak RSS, machine info, the peer's venv, writing JSON); `reference.py` the papers' reference solvers, which the
tests in tests/pruners/ compare spp against too. This package imports only the standard library at import time, so
a worker's clock starts before torch loads and the peer's script runs under the peer's own venv.
"""

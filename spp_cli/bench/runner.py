"""`spp bench`: what pruning and recovery will cost on this device, for a model or a real model's shape.

    result = run_bench(BenchOptions(shape="llama-7b", blocks=2, nsamples=128, seqlen=2048))

Order: build (random init on the device for a shape; load and keep the first `blocks` blocks for a model), the
prune cases on CPU copies (spp_cli/bench/prune.py), then the model is made 2:4 by magnitude (so the recovery
methods see real zeros and the 2:4 kernels have a valid pattern) and kept in CPU memory, each section copying it to
the device: recovery and merge (recovery.py), eval tokens/s and 2:4 semi-structured speed (inference.py).
Library code: progress goes to `on_event` as "note" events; the result is one JSON-ready dict.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import asdict, dataclass, field

import torch

from spp_cli.bench.measure import large_allocations_mmapped, memory_method, parameter_bytes, release
from spp_cli.errors import BadInput
from spp_cli.events import Listener, notify

SECTIONS = ("prune", "recovery", "eval", "semi-structured")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchOptions:
    model: str | None = None  # a model folder, hub id or builtin:NAME ...
    shape: str | None = None  # ... or a shape of spp_cli/bench/shapes.py (exactly one of the two)
    blocks: int = 2  # decoder blocks built (a model keeps its first `blocks`)
    nsamples: int = 128  # calibration windows
    seqlen: int | None = None  # calibration window, training and eval sequence; None: min(2048, max positions)
    batch: int = 1  # sequences per recovery step and per eval forward
    steps: int = 3  # timed repeats (median) after one warm-up
    sparsity: float = 0.5  # of the unstructured prune cases
    methods: list[str] = field(default_factory=list)  # recovery methods; empty: every one
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on a GPU that has it (else float16), float32 on a CPU
    seed: int = 0
    trust_remote_code: bool = False
    allow_pickle: bool = False


def check_options(options: BenchOptions) -> None:
    """BadInput for options that cannot run (before anything is built)."""
    from spp_cli.adapters import METHODS
    from spp_cli.bench.shapes import shape_named

    if (options.model is None) == (options.shape is None):
        raise BadInput("give a MODEL or --shape NAME (exactly one): e.g. `spp bench --shape llama-7b`")
    if options.shape is not None:
        shape_named(options.shape)
    for name, value, low in (("--blocks", options.blocks, 1), ("--nsamples", options.nsamples, 1),
                             ("--batch", options.batch, 1), ("--steps", options.steps, 1)):
        if value < low:
            raise BadInput(f"{name} {value} is invalid: use at least {low}")
    if not 0 < options.sparsity < 1:
        raise BadInput(f"--sparsity {options.sparsity} is invalid: use a value in (0, 1)")
    for method in options.methods:
        if method not in METHODS:
            raise BadInput(f"--methods: {method!r} is unknown: use some of {', '.join(METHODS)}")
    for section in options.sections:
        if section not in SECTIONS:
            raise BadInput(f"--sections: {section!r} is unknown: use some of {', '.join(SECTIONS)}")
    if options.dtype not in ("auto", *DTYPES):
        raise BadInput(f"unknown --dtype {options.dtype!r}: use auto, {', '.join(DTYPES)}")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def build_model(options: BenchOptions, device: str, dtype: torch.dtype):
    """(model with `blocks` blocks, in `dtype`, on `device` for a shape or in CPU memory for a model; real depth;
    a description)."""
    from pruners.blocks import find_decoder_blocks
    from spp_cli.bench.shapes import random_shape_model

    if options.shape is not None:
        model = random_shape_model(options.shape, options.blocks, device, dtype, options.seed)
        return model, model.config.spp_real_depth, {"shape": options.shape, "source": "random init on the device"}
    from spp_cli.io.checkpoint import load_model

    model, _ = load_model(options.model, dtype=str(dtype).removeprefix("torch."),
                          trust_remote_code=options.trust_remote_code, allow_pickle=options.allow_pickle,
                          with_tokenizer=False)
    prefix, blocks = find_decoder_blocks(model)
    real_depth = len(blocks)
    if options.blocks < real_depth:  # keep the first `blocks`: the others are what the extrapolation stands for
        parent_name, _, attribute = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attribute,
                torch.nn.ModuleList(list(blocks)[: options.blocks]))
        model.config.num_hidden_layers = options.blocks
    return model, real_depth, {"shape": None, "source": options.model}


def describe_model(model, real_depth: int, built: dict, dtype: torch.dtype) -> dict:
    from pruners.blocks import find_decoder_blocks

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    _, blocks = find_decoder_blocks(model)
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
    return {**built, "architecture": type(model).__name__, **{key: getattr(config, key, None) for key in keys},
            "blocks_built": len(blocks), "real_depth": real_depth, "dtype": str(dtype).removeprefix("torch."),
            "params_per_block": sum(p.numel() for p in blocks[0].parameters()),
            "params_built": sum(p.numel() for p in model.parameters())}


def describe_device(device: str) -> dict:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                "memory_bytes": props.total_memory}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def run_bench(options: BenchOptions, on_event: Listener | None = None) -> dict:
    """Measure every section asked for; return the JSON-ready result (layout: README, `spp bench --format json`)."""
    from spp_cli.adapters import METHODS
    from spp_cli.environment import resolve_device, versions
    from spp_cli.io.checkpoint import resolve_seqlen

    check_options(options)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    model, real_depth, built = build_model(options, device, dtype)
    seqlen = resolve_seqlen(model.config, options.seqlen)
    result = {"bench": "spp bench", "options": {**asdict(options), "seqlen": seqlen, "device": device},
              "model": describe_model(model, real_depth, built, dtype), "device": describe_device(device),
              "memory_measure": memory_method(device), "versions": versions()}
    with contextlib.nullcontext() if device.startswith("cuda") else large_allocations_mmapped():
        measure_sections(model, options, result, device, dtype, lambda text: notify(on_event, "bench", "note", text),
                         methods=options.methods or list(METHODS))
    return result


def measure_sections(model, options: BenchOptions, result: dict, device: str, dtype: torch.dtype, tell,
                     methods: list[str]) -> None:
    """Fill result's sections in place (prune, recovery, eval, semi_structured), in the module docstring's order."""
    from pruners.blocks import find_decoder_blocks, prunable_linears
    from spp_cli.bench.inference import bench_eval, bench_semi_structured
    from spp_cli.bench.prune import bench_prune, calibration_ids
    from spp_cli.bench.recovery import bench_recovery

    real_depth, blocks = result["model"]["real_depth"], result["model"]["blocks_built"]
    seqlen, vocab = result["options"]["seqlen"], result["model"]["vocab_size"]
    if "prune" in options.sections:
        ids = calibration_ids(vocab, options.nsamples, seqlen, options.seed)
        result["prune"] = bench_prune(model, ids, device, options.sparsity, real_depth, tell)
    make_two_of_four(model)
    model.to("cpu")  # each section copies it to the device: the device holds only what is measured
    release(device)
    sizes = {"blocks": blocks, "real_depth": real_depth, "steps": options.steps,
             "targets": list(prunable_linears(model)), "block_bytes": parameter_bytes(find_decoder_blocks(model)[1][0])}
    batch = calibration_ids(vocab, options.batch, seqlen, options.seed + 1).to(device)
    if "recovery" in options.sections:
        result["recovery"] = bench_recovery(model, methods, batch, sizes, device, dtype, tell)
    if "eval" in options.sections:
        tell("bench: eval forward")
        result["eval"] = bench_eval(model, batch, sizes, device)
    if "semi-structured" in options.sections:
        tell("bench: 2:4 semi-structured linears and prefill")
        result["semi_structured"] = bench_semi_structured(model, batch, device, options.steps)


def make_two_of_four(model) -> None:
    """Zero the 2 smallest |w| of every 4 consecutive inputs of each decoder linear (magnitude 2:4), in place."""
    from pruners.masks import parse_pattern
    from pruners.sequential import PruneOptions, prune_model

    prune_model(model, None, PruneOptions("magnitude", parse_pattern("2:4"), device=next(model.parameters()).device))

"""Weightless model shapes for `spp bench --shape NAME`: the real sizes of public checkpoints, a few blocks built
with random weights directly on the device, so a 70B block is measured without downloading 140 GB.

Each shape is the LlamaConfig keyword arguments of the public config.json it names (hidden_size,
intermediate_size, attention and KV heads, vocabulary, depth, positions, RoPE base); `shape_config(name, blocks)`
keeps `blocks` of its `num_hidden_layers` and remembers the real depth, which the bench extrapolates to.
"""

from __future__ import annotations

from typing import Any

from spp_cli.errors import BadInput

_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)
_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)

SHAPES: dict[str, dict[str, Any]] = {
    # the suite's: every width divisible by 16 (SPP's groups) and by 4 (2:4), a vocabulary the shipped tiny
    # model's tokenizer fits in, grouped-query attention as in the 70B shapes
    "tiny": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6),
    # meta-llama/Llama-2-{7,13,70}b-hf config.json
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, **_LLAMA2),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, **_LLAMA2),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, **_LLAMA2),
    # meta-llama/Meta-Llama-3-{8,70}B config.json
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, **_LLAMA3),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, **_LLAMA3),
}


def shape_named(name: str) -> dict[str, Any]:
    if name not in SHAPES:
        raise BadInput(f"unknown --shape {name!r}: use one of {', '.join(SHAPES)}")
    return dict(SHAPES[name])


def shape_config(name: str, blocks: int):
    """transformers.LlamaConfig of shape `name` with `blocks` decoder blocks (at most the real depth)."""
    import transformers

    sizes = shape_named(name)
    if blocks < 1:
        raise BadInput(f"--blocks {blocks} is invalid: use at least 1")
    real_depth = sizes["num_hidden_layers"]
    sizes["num_hidden_layers"] = min(blocks, real_depth)
    rope = {"rope_type": "default", "rope_theta": sizes.pop("rope_theta")} if "rope_theta" in sizes else None
    config = transformers.LlamaConfig(**sizes, **({"rope_parameters": rope} if rope else {}))
    config.spp_real_depth = real_depth
    return config


def random_shape_model(name: str, blocks: int, device: str = "cpu", dtype=None, seed: int = 0):
    """A random-init LlamaForCausalLM of shape `name` with `blocks` blocks, built on `device` in `dtype` (a torch
    dtype; None: float32), eval mode. The real depth is in `model.config.spp_real_depth`."""
    import torch
    from transformers import AutoModelForCausalLM

    config = shape_config(name, blocks)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    model.config.spp_real_depth = config.spp_real_depth
    return model.eval()

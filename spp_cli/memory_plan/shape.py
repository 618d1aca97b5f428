"""A model's sizes without loading it: config.json, and the safetensors headers when the weights are local.

`ModelShape` is what the memory plan (spp_cli/memory_plan/estimate.py) multiplies: parameter counts, the largest
block and tensor, the linears of one block (their in/out features: Hessians, adapters) and the bytes on disk. Pure
Python (json only; headers through spp_cli/io/safetensors_header.py): `spp --help` and `spp run --dry-run` stay light.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from spp_cli.io.safetensors_header import read_header

# bytes per element, by torch name and by safetensors name
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "F32": 4, "F16": 2, "BF16": 2, "F64": 8,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_BLOCK_INDEX = re.compile(r"\.(?:layers|h|blocks|block|decoder_layers)\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a decoder-only LM. Counts are elements; `stored_bytes` is what the weights take on disk."""

    hidden: int
    intermediate: int
    vocab: int
    blocks: int
    max_positions: int
    parameters: int  # every weight
    block_parameters: int  # the largest decoder block
    largest_tensor: int  # elements of the largest single tensor (the embedding, usually)
    linears: tuple[tuple[int, int], ...]  # (in_features, out_features) of one block's prunable linears
    stored_dtype: str  # float32 | float16 | bfloat16
    stored_bytes: int

    @property
    def outside_blocks(self) -> int:
        """Elements outside the decoder blocks: embeddings, final norm, lm_head."""
        return max(0, self.parameters - self.blocks * self.block_parameters)

    @property
    def largest_linear(self) -> int:
        """Elements of the largest prunable linear."""
        return max(i * o for i, o in self.linears)

    @property
    def adapted_weights(self) -> int:
        """Elements of every block's prunable linears (what masked-full trains, what a mask covers)."""
        return self.blocks * sum(i * o for i, o in self.linears)


def _text_config(config: dict) -> dict:
    """A multimodal config's language model part (Gemma 3's text_config), else the config itself."""
    return {**config, **config["text_config"]} if isinstance(config.get("text_config"), dict) else config


def block_linears(config: dict) -> tuple[tuple[int, int], ...]:
    """(in, out) of one decoder block's linears: attention q, k, v, o and a gated MLP (every expert's, for MoE)."""
    hidden = config["hidden_size"]
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or hidden // heads
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    attention = ((hidden, heads * head_dim), (hidden, kv), (hidden, kv), (heads * head_dim, hidden))
    experts = config.get("num_local_experts") or config.get("num_experts") or 0
    if experts:
        width = config.get("moe_intermediate_size") or config["intermediate_size"]
        return attention + ((hidden, width), (hidden, width), (width, hidden)) * experts
    width = config.get("intermediate_size") or config.get("ffn_dim") or 4 * hidden
    gated = config.get("model_type") not in ("opt", "gpt2", "gpt_neox", "falcon", "phi")
    return attention + (((hidden, width), (hidden, width), (width, hidden)) if gated else
                        ((hidden, width), (width, hidden)))


def shape_from_config(config: dict, stored_bytes: int | None = None, stored_dtype: str | None = None,
                      tensor_sizes: dict[str, int] | None = None) -> ModelShape:
    """ModelShape of a config.json dict; `tensor_sizes` (name -> elements, from the safetensors headers) make the
    counts exact, else they are the LLaMA-style arithmetic of the config."""
    config = _text_config(config)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    blocks = config.get("num_hidden_layers") or config.get("n_layer") or 1
    linears = block_linears(config)
    if tensor_sizes:
        per_block = Counter()
        for name, size in tensor_sizes.items():
            if match := _BLOCK_INDEX.search(name):
                per_block[int(match.group(1))] += size
        parameters, block = sum(tensor_sizes.values()), max(per_block.values(), default=0)
        largest = max(tensor_sizes.values())
    else:
        block = sum(i * o for i, o in linears) + 2 * hidden  # + the two norms
        tied = config.get("tie_word_embeddings", False)
        parameters = blocks * block + vocab * hidden * (1 if tied else 2) + hidden
        largest = max(vocab * hidden, max(i * o for i, o in linears))
    dtype = stored_dtype or str(config.get("torch_dtype") or config.get("dtype") or "float32")
    dtype = dtype if dtype in DTYPE_BYTES else "float32"
    return ModelShape(
        hidden=hidden, intermediate=config.get("intermediate_size") or config.get("ffn_dim") or 4 * hidden,
        vocab=vocab, blocks=blocks, max_positions=config.get("max_position_embeddings") or 2048,
        parameters=parameters, block_parameters=block, largest_tensor=largest, linears=linears,
        stored_dtype=dtype, stored_bytes=stored_bytes if stored_bytes is not None else parameters * DTYPE_BYTES[dtype],
    )


def read_model_shape(directory: str | Path) -> ModelShape | None:
    """The shape of a local model folder (config.json; exact sizes from its safetensors headers), or None when the
    folder has no config.json."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    sizes, stored, dtypes = {}, 0, Counter()
    for file in sorted(directory.glob("*.safetensors")):
        for name, entry in read_header(file)[0].items():
            start, end = entry["data_offsets"]
            sizes[name] = (end - start) // DTYPE_BYTES.get(entry["dtype"], 1)
            stored += end - start
            dtypes[entry["dtype"]] += end - start
    if not sizes:
        return shape_from_config(config)
    dtype = SAFETENSORS_DTYPES.get(dtypes.most_common(1)[0][0], "float32")
    return shape_from_config(config, stored_bytes=stored, stored_dtype=dtype, tensor_sizes=sizes)


def model_shape(model: str, trust_remote_code: bool = False) -> ModelShape | None:
    """The shape of a model reference (builtin:NAME, a local folder, or a hub id whose config is cached or
    reachable); None when its config cannot be read without loading weights."""
    from spp_cli.io.checkpoint import resolve_model_path

    path = resolve_model_path(model)
    if Path(path).is_dir():
        return read_model_shape(path)
    try:
        from transformers import AutoConfig

        return shape_from_config(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).to_dict())
    except Exception:  # offline, unknown id: no plan, the stage itself says what is wrong
        return None

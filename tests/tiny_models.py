"""The one place tests build random models and their tokenizer: small configs of every architecture the suite
covers, a saved random checkpoint, and the one byte-level BPE tokenizer; plus adapter helpers."""

import copy
import functools
import json
from pathlib import Path

import torch
from conftest import FIXTURE_DATA, SOME_DATA
from torch import nn

from spp_cli.adapters.spp import spp_layers

ALPACA = SOME_DATA / "alpaca" / "alpaca_small.json"  # the full subset, else its committed cut
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VOCAB = 320
# every random test model: hidden 64, 4 heads of 16, MLP 128, 2 blocks, unless a test says otherwise
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256)
# the config class of each architecture, and what it needs beyond BASE to be this small
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),  # its default pad id is beyond a small vocabulary
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                     "head_dim": 16, "norm_topk_prob": True}),
}


@functools.lru_cache(maxsize=1)
def _trained_tokenizer():
    from spp_cli.data.bpe import train_byte_level_bpe

    records = json.loads((FIXTURE_DATA / "alpaca" / "alpaca_small.json").read_text(encoding="utf-8"))
    return train_byte_level_bpe([" ".join([r["instruction"], r["input"], r["output"]]) for r in records], VOCAB)


def tiny_tokenizer():
    """The tests' tokenizer: byte-level BPE (vocab 320; <unk> <s> </s> <pad> = ids 0-3, <s> prepended like LLaMA's,
    </s> as EOS) trained on the committed Alpaca records in tests/fixtures/data; a fresh copy on every call."""
    return copy.deepcopy(_trained_tokenizer())


def tiny_config(arch: str = "llama", **options):
    """A random-init config of `arch` (a key of ARCHITECTURES, or "opt"): BASE, its needs, then `options`."""
    import transformers

    if arch == "opt":  # OPT names the MLP width ffn_dim and has no grouped-query attention
        sizes = {**BASE, **options}
        sizes["ffn_dim"] = sizes.pop("intermediate_size")
        sizes.pop("num_key_value_heads")
        return transformers.OPTConfig(**sizes, word_embed_proj_dim=sizes["hidden_size"], pad_token_id=1)
    name, needs = ARCHITECTURES[arch]
    return getattr(transformers, name)(**{**BASE, **needs, **options})


def random_model(arch: str = "llama", seed: int = 0, dtype=None, **options) -> nn.Module:
    """A random-init model of tiny_config(arch, **options), seeded, in eval mode (and `dtype` when given)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **options)).eval()
    return model.to(dtype) if dtype is not None else model


def save_random_model(directory: Path, arch: str = "llama", seed: int = 0, dtype=None, shard: str = "5GB",
                      model: nn.Module | None = None, **options) -> Path:
    """`model` (default: random_model(arch, seed, dtype, **options)) saved to `directory` with tiny_tokenizer(),
    in safetensors shards of at most `shard`: a stand-in user checkpoint."""
    model = model if model is not None else random_model(arch, seed, dtype, **options)
    model.save_pretrained(directory, max_shard_size=shard)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def tiny_llama(seed: int = 0, init_std: float = 0.02) -> nn.Module:
    """random_model("llama") in fp32 and train mode; every projection's out_features % 16 == 0 (SPP's groups).

    A larger init_std gives far-from-uniform logits, so that a few SPP steps have a loss to lower."""
    return random_model("llama", seed, torch.float32, initializer_range=init_std).train()


def decoder_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(PROJECTIONS)]


def magnitude_mask(weight: torch.Tensor, pattern: str) -> torch.Tensor:
    """True = prune. "unstructured": the 50% smallest |w| of the matrix; "N:M": the N smallest of every M
    consecutive inputs of each row."""
    score = weight.abs()
    if pattern == "unstructured":
        threshold = score.flatten().kthvalue(score.numel() // 2).values
        return score <= threshold
    n, m = map(int, pattern.split(":"))
    groups = score.reshape(-1, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, groups.topk(n, dim=1, largest=False).indices, True)
    return mask.reshape(weight.shape)


def pruned_tiny_llama(pattern: str = "unstructured", seed: int = 0, init_std: float = 0.02) -> nn.Module:
    model = tiny_llama(seed, init_std=init_std)
    with torch.no_grad():
        for name in decoder_linears(model):
            weight = model.get_submodule(name).weight
            weight[magnitude_mask(weight, pattern)] = 0
    return model


def randomize_adapters(model: nn.Module, seed: int = 1, beta_std: float = 0.3) -> None:
    """Nonzero α and β, so the branch and the merge actually do something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in spp_layers(model).values():
            layer.spp_alpha.copy_(torch.randn(layer.spp_alpha.shape, generator=generator))
            layer.spp_beta.copy_(torch.randn(layer.spp_beta.shape, generator=generator) * beta_std)


def batch_ids(seed: int = 3, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(4, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))



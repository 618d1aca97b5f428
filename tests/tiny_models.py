"""Tiny models, tokenizers and adapters shared by the adapter, trainer and stage tests."""

import functools
import json

import torch
from conftest import TEST_DATA
from torch import nn

from spp_cli.adapters.spp import spp_layers

DATA_DIR = TEST_DATA
ALPACA = DATA_DIR / "alpaca" / "alpaca_small.json"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """Byte-level BPE (vocab 512, <s> prepended like LLaMA's, </s> as EOS) trained on 300 Alpaca records."""
    from spp_cli.data.bpe import train_byte_level_bpe

    records = json.loads(ALPACA.read_text())[:300]
    texts = [" ".join([r["instruction"], r["input"], r["output"]]) for r in records]
    return train_byte_level_bpe(texts, 512, special_tokens=("<s>", "</s>"))


def tiny_llama(seed: int = 0, vocab_size: int = 512, init_std: float = 0.02) -> nn.Module:
    """A random LLaMA: hidden 64, 2 layers, 4 heads, MLP 128 (every projection's out_features % 16 == 0).

    A larger init_std gives far-from-uniform logits, so that a few SPP steps have a loss to lower."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, initializer_range=init_std)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


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
    return torch.randint(2, 512, shape, generator=torch.Generator().manual_seed(seed))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))



"""Train the shipped tiny model (`builtin:tiny-llama`) on `builtin:python-docs:train`, on CPU.

    .venv/bin/python scripts/train_tiny_model.py --out spp_cli/assets/tiny-llama

Steps: build the corpus, train a byte-level BPE tokenizer on the train split, train a small LLaMA from scratch
on random windows of the tokenized train stream, measure held-out token perplexity (dense, magnitude 2:4,
magnitude 70%), and save fp16 safetensors + tokenizer + a model card that records all of it. Deterministic for
a given Python version, torch version and thread count (the corpus depends on the Python version).
"""

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spp_cli.data.bpe import train_byte_level_bpe  # noqa: E402
from spp_cli.data.builtin_corpus import load_python_docs  # noqa: E402

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with a BOS prepended to every encoded text (as LLaMA's tokenizer does), plus a chat template."""
    tokenizer = train_byte_level_bpe(documents, vocab_size)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    return torch.tensor(tokenizer("\n\n".join(documents)).input_ids, dtype=torch.long)


@torch.no_grad()
def token_perplexity(model, stream: torch.Tensor, seqlen: int) -> float:
    """The papers' protocol: non-overlapping windows, tail dropped, exp(mean token NLL)."""
    windows = stream[: (stream.numel() // seqlen) * seqlen].view(-1, seqlen)
    total_nll = 0.0
    for batch in windows.split(8):
        logits = model(batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        total_nll += float(nll) * batch.shape[0]
    return math.exp(total_nll / windows.shape[0])


@torch.no_grad()
def magnitude_prune_copy(model, pattern: str):
    """A pruned copy for the model card: magnitude, per matrix (unstructured) or per group (N:M)."""
    import copy

    pruned = copy.deepcopy(model)
    for block in pruned.model.layers:
        for linear in (m for m in block.modules() if isinstance(m, torch.nn.Linear)):
            weight = linear.weight
            if ":" in pattern:
                n, m = map(int, pattern.split(":"))
                groups = weight.abs().reshape(weight.shape[0], -1, m)
                drop = groups.topk(n, dim=-1, largest=False).indices
                mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
                weight[mask.reshape(weight.shape)] = 0
            else:
                sparsity = float(pattern)
                threshold = weight.abs().flatten().sort().values[int(weight.numel() * sparsity)]
                weight[weight.abs() <= threshold] = 0
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="spp_cli/assets/tiny-llama")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--intermediate-size", type=int, default=352)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokens", type=float, default=6e6, help="training tokens in total")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.time()
    corpus = load_python_docs()
    tokenizer = train_tokenizer(corpus.documents("train"), args.vocab_size)
    streams = {split: token_stream(tokenizer, corpus.documents(split)) for split in ("train", "validation", "test")}
    print({split: stream.numel() for split, stream in streams.items()}, flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    tokens_per_step = args.batch_size * args.seqlen
    steps = int(args.tokens // tokens_per_step)
    warmup = max(1, steps // 50)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    train = streams["train"]
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, train.numel() - args.seqlen - 1, (args.batch_size,), generator=generator)
        batch = torch.stack([train[s : s + args.seqlen] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}/{steps} loss {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)
    model.eval()

    model = model.to(torch.float16).to(torch.float32)  # measure what is shipped: fp16 weights
    evaluation_seqlen = args.seqlen
    perplexity = {
        "dense": {split: token_perplexity(model, streams[split], evaluation_seqlen) for split in ("validation", "test")}
    }
    for pattern, label in (("2:4", "magnitude 2:4"), ("0.7", "magnitude 70%")):
        pruned = magnitude_prune_copy(model, pattern)
        perplexity[label] = {
            split: token_perplexity(pruned, streams[split], evaluation_seqlen) for split in ("validation", "test")
        }
    print(json.dumps(perplexity, indent=1), flush=True)

    out = Path(args.out)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent if out.parent.exists() else None))
    model.to(torch.float16).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    card = {
        "command": "python scripts/train_tiny_model.py " + " ".join(sys.argv[1:]),
        "python_version": corpus.python_version,
        "torch_version": torch.__version__,
        "corpus": "builtin:python-docs",
        "corpus_sha256": corpus.sha256,
        "train_tokens_in_corpus": streams["train"].numel(),
        "training_tokens": steps * tokens_per_step,
        "steps": steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_seconds": round(time.time() - started),
        "threads": args.threads,
        "perplexity_protocol": f"token, non-overlapping windows @{evaluation_seqlen}, fp16 weights",
        "perplexity": perplexity,
    }
    (staging / "training.json").write_text(json.dumps(card, indent=2) + "\n")
    (staging / "README.md").write_text(model_card(card, config))
    if out.exists():
        shutil.rmtree(out)
    staging.chmod(0o755)  # mkdtemp makes it private; the package data must be readable by everyone
    staging.rename(out)
    print(f"saved {out} in {time.time() - started:.0f} s", flush=True)


def model_card(card: dict, config: LlamaConfig) -> str:
    rows = "\n".join(
        f"| {label} | {values['validation']:.2f} | {values['test']:.2f} |"
        for label, values in card["perplexity"].items()
    )
    return f"""# tiny-llama (spp's embedded default model, `builtin:tiny-llama`)

A {card["parameters"] / 1e6:.2f}M-parameter LLaMA-architecture model with its own byte-level BPE tokenizer
(vocabulary {config.vocab_size}), trained from scratch on CPU on `builtin:python-docs:train` (the pydoc topics and
standard-library docstrings of Python {card["python_version"]}). It exists so that `spp` can be tried, tested
and demonstrated offline on a laptop: pruning visibly hurts it and SPP visibly helps it. It is not a useful
language model.

- Architecture: hidden {config.hidden_size}, intermediate {config.intermediate_size}, {config.num_hidden_layers}
  blocks, {config.num_attention_heads} heads, untied embeddings; weights stored in fp16.
- Made by: `{card["command"]}` (torch {card["torch_version"]}, {card["threads"]} CPU threads,
  {card["training_seconds"]} s).
- Training: {card["training_tokens"]:,} tokens ({card["steps"]} steps) sampled from a
  {card["train_tokens_in_corpus"]:,}-token train stream.
- Corpus sha256 (documents joined with "\\n\\n"): train `{card["corpus_sha256"]["train"]}`,
  validation `{card["corpus_sha256"]["validation"]}`, test `{card["corpus_sha256"]["test"]}`.
  The corpus depends on the Python version; the numbers below hold for Python {card["python_version"]}.

Held-out token perplexity ({card["perplexity_protocol"]}; magnitude = one threshold per matrix for 70%,
per-row groups for 2:4, on every linear inside the decoder blocks):

| weights | python-docs validation | python-docs test |
|---|---|---|
{rows}
"""


if __name__ == "__main__":
    main()

"""loss_normalization: transformers 5.x's token mean over the whole step vs SPP's reference per-micro-batch mean.

One optimizer step of 8 examples in 8 micro-batches of 1 (accumulation 8), where 4 examples have many target
tokens and 4 have few. The logged loss of step 1 is computed before any update, so it can be checked against
the base model, whatever order the sampler drew:
  batch:       sum of every token's loss / number of target tokens of the step;
  micro_batch: mean over the 8 micro-batches of each one's token mean.
"""

import pytest
import torch
from tiny_models import decoder_linears, pruned_tiny_llama, tiny_tokenizer

from spp_cli.data.examples import build_examples
from spp_cli.errors import BadInput
from spp_cli.recipe.schema import FinetuneStage
from spp_cli.training.trainer import run_finetune

TOLERANCE = 1e-4  # the logged loss against the formula (float32 sums)
RECORDS = [{"instruction": f"Say {word}.", "output": word} for word in ("yes", "no", "up", "ok")] + [
    {"instruction": f"Describe item {i}.", "output": "It is a long and detailed answer about the thing. " * 12}
    for i in range(4)
]


def per_example_losses(model, tokenizer) -> list[tuple[float, int]]:
    """(sum of token losses, number of target tokens) of every example, on the untrained model."""
    totals = []
    with torch.no_grad():
        for example in build_examples(tokenizer, RECORDS, 256):
            ids = torch.tensor([example["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            targets = torch.tensor(example["labels"][1:])
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum", ignore_index=-100)
            totals.append((loss.item(), int((targets != -100).sum())))
    return totals


def first_logged_loss(tmp_path, mode: str) -> float:
    model = pruned_tiny_llama(init_std=0.3)
    config = FinetuneStage(data="records", max_steps=1, seqlen=256, batch_size=8, micro_batch_size=1, val_size=0,
                           lr=1e-3, dropout=0.0, save_steps=100, logging_steps=1, loss_normalization=mode)
    result = run_finetune(model, tiny_tokenizer(), RECORDS, config, tmp_path / mode,
                          target_names=decoder_linears(model))
    return result.train_curve[0]["loss"]


def test_batch_is_the_step_token_mean_and_micro_batch_the_mean_of_micro_batch_means(tmp_path):
    losses = per_example_losses(pruned_tiny_llama(init_std=0.3), tiny_tokenizer())
    token_mean = sum(total for total, _ in losses) / sum(count for _, count in losses)
    micro_batch_mean = sum(total / count for total, count in losses) / len(losses)
    # uneven examples: the two rules differ by far more than the tolerance, so each check below tells them apart
    assert abs(micro_batch_mean - token_mean) > 10 * TOLERANCE
    assert first_logged_loss(tmp_path, "batch") == pytest.approx(token_mean, abs=TOLERANCE)
    assert first_logged_loss(tmp_path, "micro_batch") == pytest.approx(micro_batch_mean, abs=TOLERANCE)


def test_unknown_loss_normalization_is_bad_input():
    from spp_cli.recipe.resolve import validate_options

    with pytest.raises(BadInput, match="--loss-normalization: 'mean' is not one of batch, micro_batch"):
        validate_options(FinetuneStage, {"data": "records", "loss_normalization": "mean"}, flags=True)

"""The one byte-level BPE tokenizer builder, shared by scripts/train_tiny_model.py (the shipped model's
tokenizer) and the tests' tiny models: trained in a blink on the given texts, BOS prepended like LLaMA's."""

from transformers import PreTrainedTokenizerFast

LLAMA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def train_byte_level_bpe(
    texts: list[str], vocab_size: int, special_tokens: tuple[str, ...] = LLAMA_SPECIALS
) -> PreTrainedTokenizerFast:
    """A tokenizer with `special_tokens` first in the vocabulary (ids 0, 1, ...), `<s>` prepended to every
    encoded text and `</s>` as EOS; `<unk>` and `<pad>` are set when they are among the specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    optional = {key: tok for key, tok in (("unk_token", "<unk>"), ("pad_token", "<pad>")) if tok in special_tokens}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", **optional)

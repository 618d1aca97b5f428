"""Records -> tokenized training examples (input_ids, attention_mask, labels) and the padding collator.

Records (spp_cli.data.sources.read_records) are validated and put in canonical form first
(spp_cli.data.formats.normalize_records, where the formats and `data_format` are defined): alpaca
{"instruction", "input", "output"} rendered with the alpaca template (spec/spp-method.md §2, alpaca-lora's
templates/alpaca.json), one example per record, whatever else the record carries; chat {"messages": [{"role",
"content"}]} rendered with the tokenizer's chat template, or "role: content" lines without one; plain {"text"}
documents, concatenated (EOS between documents) and packed into seqlen windows.

Loss is on every token by default (SPP's train_on_inputs=True); mask_prompt=True sets the prompt's labels to -100.
"""

from __future__ import annotations

import torch

from spp_cli.data.formats import normalize_records
from spp_cli.errors import BadInput

IGNORE_INDEX = -100
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The alpaca template up to and including "### Response:\\n" (with the Input section only when non-empty)."""
    if input_text:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, str]:
    """(prompt, full text) of a chat: the prompt ends where the last assistant turn's content begins.

    With a chat template the template renders both (the prompt with add_generation_prompt=True); without one,
    each turn is a "role: content" line. `messages` are already validated (formats.normalize_records).
    """
    last_is_reply = messages[-1]["role"] == "assistant"
    context = messages[:-1] if last_is_reply else messages
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        return (prompt if last_is_reply else full), full
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    full = "\n".join(lines)
    if not last_is_reply:
        return full, full
    return "\n".join(lines[:-1] + ["assistant: "]), full


def _prompt_and_text(tokenizer, record: dict) -> tuple[str, str, bool]:
    """(prompt, full text, add_special_tokens) of a canonical alpaca or chat record."""
    if "messages" in record:
        prompt, full = render_chat(tokenizer, record["messages"])
        return prompt, full, not getattr(tokenizer, "chat_template", None)  # templates carry their own BOS
    prompt = alpaca_prompt(record["instruction"], record["input"])
    return prompt, prompt + record["output"], True


def tokenize_prompt_records(tokenizer, records: list[dict], seqlen: int, mask_prompt: bool = False) -> list[dict]:
    """One example per alpaca/chat record: truncated to seqlen, EOS appended when it fits (alpaca-lora's rule).

    Texts are tokenized in batched calls (one per add_special_tokens setting), not one call per record.
    """
    eos = tokenizer.eos_token_id
    rendered = [_prompt_and_text(tokenizer, record) for record in records]

    def encode(texts: list[str], special: bool) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=special, truncation=True, max_length=seqlen)["input_ids"]

    examples: list[dict] = [{} for _ in records]
    for special in (True, False):
        indices = [i for i, item in enumerate(rendered) if item[2] is special]
        if not indices:
            continue
        full_ids = encode([rendered[i][1] for i in indices], special)
        prompt_ids = encode([rendered[i][0] for i in indices], special) if mask_prompt else None
        for k, i in enumerate(indices):
            ids = full_ids[k]
            if eos is not None and (not ids or ids[-1] != eos) and len(ids) < seqlen:
                ids = ids + [eos]
            labels = list(ids)
            if prompt_ids is not None:
                prompt_len = min(len(prompt_ids[k]), len(labels))
                labels[:prompt_len] = [IGNORE_INDEX] * prompt_len
            examples[i] = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
    return examples


def pack_texts(tokenizer, texts: list[str], seqlen: int) -> list[dict]:
    """Plain documents, each followed by EOS, concatenated and cut into seqlen windows (the tail is dropped
    unless it is the only window)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        stream.extend(ids + ([eos] if eos is not None else []))
    windows = [stream[i:i + seqlen] for i in range(0, len(stream) - seqlen + 1, seqlen)] or [stream]
    return [{"input_ids": w, "attention_mask": [1] * len(w), "labels": list(w)} for w in windows if w]


def build_examples(
    tokenizer,
    records: list[dict],
    seqlen: int,
    mask_prompt: bool = False,
    *,
    data_format: str = "auto",
    source: str | None = None,
) -> list[dict]:
    """Tokenized examples for every record: alpaca/chat records one each, then the packed text windows.

    data_format: auto | alpaca | chat | text (spp_cli.data.formats); `source` only names the data in errors.
    Examples with no label left to learn (a prompt that fills seqlen under mask_prompt) are dropped; BadInput
    when none is left, or for a record the format rejects.
    """
    if seqlen < 2:
        raise BadInput(f"--seqlen {seqlen} is too short: use at least 2 (default 512)")
    records = normalize_records(records, data_format, mask_prompt=mask_prompt, source=source)
    prompted = [r for r in records if "text" not in r]
    texts = [r["text"] for r in records if "text" in r and r["text"].strip()]
    examples = tokenize_prompt_records(tokenizer, prompted, seqlen, mask_prompt) if prompted else []
    if texts:
        examples += pack_texts(tokenizer, texts, seqlen)
    # labels[0] is never a target (the model predicts token t+1 from token t)
    learnable = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"][1:])]
    if not learnable:
        if mask_prompt and examples:
            raise BadInput(
                f"no label is left to train on: under mask_prompt every one of the {len(examples)} examples' "
                f"prompts fills --seqlen {seqlen}: raise --seqlen or drop --mask-prompt"
            )
        raise BadInput("the training data gave no examples with tokens to learn: check the data source")
    return learnable


class PaddingCollator:
    """Pads a list of examples to the longest (rounded up to a multiple of 8) on the right: pad id for inputs,
    0 for the attention mask, -100 for labels."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        length = -(-longest // self.multiple) * self.multiple
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for e in examples:
            pad = length - len(e["input_ids"])
            batch["input_ids"].append(e["input_ids"] + [self.pad_token_id] * pad)
            batch["attention_mask"].append(e["attention_mask"] + [0] * pad)
            batch["labels"].append(e["labels"] + [IGNORE_INDEX] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS, else 0 (labels mask padding anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0

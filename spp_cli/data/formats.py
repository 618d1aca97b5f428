"""Training record formats: which format a record is in, strict validation, and the canonical record.

The three formats (and `data_format`, the fine-tune option that picks one for every record):
- alpaca  {"instruction": str, "input": str (optional, may be "" or null), "output": str}, rendered with the
          Alpaca template (spec/spp-method.md §2). The hub's alpaca sets (tatsu-lab/alpaca, vicgalle/alpaca-gpt4)
          also carry `text`, the same example pre-rendered: it is accepted and ignored, so that every record is
          one templated example, as SPP's finetune.py trains.
- chat    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} with at least one
          assistant turn.
- text    {"text": str}, packed into seqlen windows. Metadata keys (TEXT_METADATA_KEYS, e.g. C4's `url` and
          `timestamp`) are accepted and ignored.

`auto` (the default) picks per record: instruction fields (instruction/input/output) -> alpaca, else
`messages` -> chat, else `text` -> text. An explicit format applies to every record; `text` then packs the
`text` field even of records that also carry instruction fields (the hub alpaca sets' pre-rendered prompts).

Any other key is an error (a misspelt `response` for `output` would otherwise train on prompts alone), named
with its record number (1-based, in the order the source yields records) and the fix.

What a run applied (spp.json's "applied", beside the asked `data_format`) is `applied_format`: the format the
records were read in and the template that rendered them (TEMPLATES).
"""

from __future__ import annotations

from spp_cli.errors import BadInput
from spp_cli.vocabulary import DATA_FORMATS

ALPACA_FIELDS = ("instruction", "input", "output")
CHAT_ROLES = ("system", "user", "assistant")
# keys a text record may carry beside `text` (metadata of common corpora), ignored
TEXT_METADATA_KEYS = ("id", "url", "timestamp", "title", "meta", "source")
# the usual misnamings, with the key they stand for: named in the error so the fix is obvious
_LIKELY_MEANT = {
    "response": "output", "answer": "output", "completion": "output", "target": "output",
    "prompt": "instruction", "question": "instruction", "query": "instruction", "context": "input",
    "conversations": "messages", "conversation": "messages", "dialog": "messages", "content": "text",
}
_ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant"}
# the template each format is rendered with (spp_cli/data/examples.py); text is packed as it is
TEMPLATES = {
    "alpaca": "alpaca",  # alpaca-lora's templates/alpaca.json (spec/spp-method.md §2)
    "chat": "the tokenizer's chat template",
    "text": None,
}
CHAT_WITHOUT_TEMPLATE = "role: content lines"  # a tokenizer without a chat template


def applied_format(records: list[dict], *, chat_template: bool) -> dict:
    """What `records` were read as (canonical ones from normalize_records, or raw ones under `auto`):
    {"data_format": alpaca | chat | text (or "mixed"), "template": the template name (None for text; names joined
    with " + " when mixed), "records": {format: count}}. `chat_template`: the tokenizer has one."""
    counts: dict[str, int] = {}
    for record in records:
        kind = record_format(record)
        counts[kind] = counts.get(kind, 0) + 1
    counts = {kind: counts[kind] for kind in TEMPLATES if kind in counts}
    templates = [TEMPLATES[kind] if kind != "chat" or chat_template else CHAT_WITHOUT_TEMPLATE for kind in counts]
    named = [template for template in templates if template is not None]
    kinds = list(counts)
    return {"data_format": kinds[0] if len(kinds) == 1 else ("mixed" if kinds else None),
            "template": " + ".join(named) if named else None, "records": counts}


# a key that belongs to another format's records: the fix is that format, not removing the key
_FORMAT_OF_KEY = {**dict.fromkeys(ALPACA_FIELDS, "alpaca"), "messages": "chat", "text": "text"}
_JSON_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "an object", type(None): "null"}


def json_kind(value) -> str:
    """What a JSON value is, with its article ("an integer", "a list"): for messages that name a wrong type."""
    return _JSON_KINDS.get(type(value), f"a {type(value).__name__}")


def record_format(record: dict, data_format: str = "auto") -> str:
    """The format (alpaca, chat or text) `record` is read in under `data_format`."""
    if data_format != "auto":
        return data_format
    if any(key in record for key in ALPACA_FIELDS):
        return "alpaca"
    if "messages" in record:
        return "chat"
    return "text"


def normalize_records(
    records: list[dict], data_format: str = "auto", *, mask_prompt: bool = False, source: str | None = None
) -> list[dict]:
    """Validate every training record and return it in canonical form: {"instruction", "input", "output"},
    {"messages"} or {"text"} (ignored keys dropped), so that the format is decided here once.

    BadInput (one line: record number, field, fix) for an unknown `data_format`, a record that does not fit
    its format, an unknown key, or `mask_prompt` with a plain-text record (it has no prompt to mask).
    Idempotent: normalizing canonical records returns equal records.
    """
    if data_format not in DATA_FORMATS:
        raise BadInput(f"data_format {data_format!r} is unknown: use one of {', '.join(DATA_FORMATS)}")
    where = f" of {source}" if source else ""
    canonical = []
    for number, record in enumerate(records, start=1):
        label = f"training record {number}{where}"
        if not isinstance(record, dict):
            raise BadInput(f"{label} is {json_kind(record)}, not a JSON object: fix the data")
        kind = record_format(record, data_format)
        if kind == "alpaca":
            canonical.append(_alpaca(record, label))
        elif kind == "chat":
            canonical.append(_chat(record, label))
        else:
            if mask_prompt:
                raise BadInput(
                    f"mask_prompt needs prompt/response records, but {label} is plain text (nothing to mask): "
                    "drop mask_prompt or use alpaca/chat records"
                )
            canonical.append(_text(record, label, data_format))
    return canonical


def _unknown_keys(record: dict, allowed: tuple[str, ...], label: str, kind: str) -> None:
    unknown = [key for key in record if key not in allowed]
    if not unknown:
        return
    key = unknown[0]
    meant = _LIKELY_MEANT.get(str(key).lower())
    other_format = _FORMAT_OF_KEY.get(key)
    if other_format is not None and kind in DATA_FORMATS:  # alpaca records read with --data-format chat, ...
        fix = f"'{key}' is a field of {other_format} records: use --data-format {other_format} (or auto)"
    elif meant:
        fix = f"rename it to '{meant}'"
    else:
        fix = f"remove it (the {kind} format has {', '.join(allowed)})"
    raise BadInput(f"{label} has an unknown key '{key}' ({kind} format): {fix}")


def _string_field(record: dict, key: str, label: str, kind: str, *, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if key not in record:
        raise BadInput(f"{label} has no '{key}', which the {kind} format needs: add it (or pick another data_format)")
    if not isinstance(value, str):
        raise BadInput(f"{label}: '{key}' is {json_kind(value)}, not a string: fix the data")
    return value


def _alpaca(record: dict, label: str) -> dict:
    _unknown_keys(record, (*ALPACA_FIELDS, "text"), label, "alpaca")
    instruction = _string_field(record, "instruction", label, "alpaca")
    if not instruction.strip():
        raise BadInput(f"{label}: 'instruction' is empty: fill it in or drop the record")
    output = _string_field(record, "output", label, "alpaca")
    if not output.strip():
        raise BadInput(f"{label}: 'output' is empty, so there is no response to learn: fill it in or drop the record")
    return {"instruction": instruction, "input": _string_field(record, "input", label, "alpaca", optional=True),
            "output": output}


def _chat(record: dict, label: str) -> dict:
    _unknown_keys(record, ("messages",), label, "chat")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadInput(f"{label}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for turn, message in enumerate(messages, start=1):
        turn_label = f"{label}, message {turn}"
        if not isinstance(message, dict):
            raise BadInput(f"{turn_label} is not a {{\"role\", \"content\"}} object: fix the data")
        _unknown_keys(message, ("role", "content"), turn_label, "chat message")
        role = _string_field(message, "role", turn_label, "chat message")
        if role not in CHAT_ROLES:
            hint = f"use '{_ROLE_HINTS[role.lower()]}'" if role.lower() in _ROLE_HINTS else "use one of them"
            raise BadInput(f"{turn_label} has role '{role}', not one of {', '.join(CHAT_ROLES)}: {hint}")
        _string_field(message, "content", turn_label, "chat message")
    if not any(message["role"] == "assistant" for message in messages):
        raise BadInput(f"{label} has no assistant message, so no reply to learn: add one or drop the record")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def _text(record: dict, label: str, data_format: str) -> dict:
    if data_format == "text":  # chosen explicitly: the other formats' fields are deliberately ignored
        allowed = ("text", *TEXT_METADATA_KEYS, *ALPACA_FIELDS, "messages")
    else:
        allowed = ("text", *TEXT_METADATA_KEYS)
    if "text" not in record:
        raise BadInput(
            f"{label} has none of text, instruction, messages: fix the data (or pick data_format alpaca/chat)"
        )
    _unknown_keys(record, allowed, label, "text")
    return {"text": _string_field(record, "text", label, "text")}

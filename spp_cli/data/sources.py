"""Text and instruction sources, calibration windows and token streams.

A SOURCE (DESIGN.md, CLI) is one of:
- a local file: `.txt` (one document), `.jsonl` (one JSON object a line) or `.json` (a list of objects), each
  object carrying `text`, alpaca `instruction`/`input`/`output`, or chat `messages`;
- `builtin:NAME[:SPLIT]`: a corpus the package builds offline (`builtin:python-docs:test`; SPLIT defaults to train);
- a dataset fetched through `datasets` when online: `c4`, `wikitext2`, `alpaca`, `alpaca-gpt4`, `hf:ORG/NAME[:SPLIT]`.
"""

import json
import os
import random
from pathlib import Path

import torch

from spp_cli.environment import is_offline
from spp_cli.errors import BadInput

# name -> (dataset path, config, split, data_files) for `datasets.load_dataset`
ONLINE_SOURCES = {
    "c4": ("allenai/c4", None, "train", {"train": "en/c4-train.00000-of-01024.json.gz"}),
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", None),
    "alpaca": ("tatsu-lab/alpaca", None, "train", None),
    "alpaca-gpt4": ("vicgalle/alpaca-gpt4", None, "train", None),
}
OFFLINE_HINTS = {
    "c4": "a local C4 slice, e.g. --calib c4-train.00000-of-01024.first1000.jsonl, or builtin:python-docs",
    "wikitext2": "a local file, e.g. wikitext-2-raw-v1/test.jsonl, or builtin:python-docs:test",
    "alpaca": "a local alpaca JSON file (instruction/input/output records), e.g. alpaca_small.json",
    "alpaca-gpt4": "a local alpaca JSON file (instruction/input/output records), e.g. alpaca_data_gpt4.json",
}
RECORD_FIELDS = ("text", "instruction", "messages")


def is_local_source(source: str) -> bool:
    return source.endswith((".txt", ".json", ".jsonl")) or os.sep in source or Path(source).exists()


def read_records(source: str) -> list[dict]:
    """Every record of SOURCE as a dict with `text`, alpaca fields, or `messages`. BadInput when unusable."""
    if source.startswith("builtin:"):
        records = [{"text": text} for text in _builtin_documents(source)]
    elif source in ONLINE_SOURCES or source.startswith("hf:"):
        records = _online_records(source)
    elif is_local_source(source):
        records = _local_records(Path(source))
    else:
        known = ", ".join([*ONLINE_SOURCES, "hf:ORG/NAME[:SPLIT]", "builtin:python-docs[:SPLIT]"])
        raise BadInput(f"unknown data source '{source}': use a .txt/.jsonl/.json file or one of {known}")
    if not records:
        raise BadInput(f"data source '{source}' has no records: point it at a file with at least one record")
    return records


def record_text(record: dict) -> str:
    """A record as plain text (for calibration and perplexity): alpaca fields and chat turns joined by newlines."""
    if "text" in record:
        return str(record["text"])
    if "messages" in record:
        return "\n".join(str(message.get("content", "")) for message in record["messages"])
    parts = (record.get("instruction"), record.get("input"), record.get("output"))
    return "\n".join(str(part) for part in parts if part)


def read_texts(source: str) -> list[str]:
    """The documents of SOURCE as plain text, empty ones dropped."""
    return [text for text in map(record_text, read_records(source)) if text.strip()]


def token_stream(tokenizer, texts: list[str], joiner: str = "\n\n") -> torch.Tensor:
    """All texts joined and tokenized in ONE call (one BOS at the very start, as the papers do): [1, L]."""
    return torch.tensor([tokenizer(joiner.join(texts)).input_ids], dtype=torch.long)


def calibration_windows(
    tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0, texts: list[str] | None = None
) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens, drawn as SparseGPT/Wanda's `get_c4` does (spec/pruners.md §1.6).

    `random.seed(seed)`; for each sample pick a random document, retry until it has MORE than seqlen tokens,
    then a random start in [0, L - seqlen - 1]. Documents are tokenized only when drawn (as in the reference: a
    whole C4 shard is never tokenized). When no document is that long, the documents are concatenated into one
    stream first and the windows are drawn from it. `texts` (already read from `source`) saves a second read.
    Returns LongTensor [nsamples, seqlen].
    """
    if nsamples < 1:
        raise BadInput(f"nsamples {nsamples} is invalid: use at least 1 calibration window")
    texts = read_texts(source) if texts is None else texts
    rng = random.Random(seed)
    # a token covers at least one byte, so only documents of more than seqlen - 2 bytes (BOS/EOS aside) can
    # hold more than seqlen tokens; their bytes bound the tokens the source can give
    candidate_bytes = sum(size for size in (len(text.encode()) for text in texts) if size + 2 > seqlen)
    if candidate_bytes and nsamples * seqlen > candidate_bytes:
        raise BadInput(
            f"calibration source '{source}' gives at most {candidate_bytes} tokens in documents longer than "
            f"{seqlen}, fewer than nsamples x seqlen = {nsamples * seqlen}: use fewer --nsamples or a larger source"
        )
    windows = _windows_from_documents(tokenizer, texts, nsamples, seqlen, rng) if candidate_bytes else None
    if windows is None:
        windows = _windows_from_stream(tokenizer, source, texts, nsamples, seqlen, rng)
    return torch.tensor(windows, dtype=torch.long)


def _windows_from_documents(tokenizer, texts, nsamples, seqlen, rng) -> list[list[int]] | None:
    """The reference loop; None when far too many draws find no document longer than seqlen tokens."""
    tokenized: dict[int, list[int]] = {}
    windows, failures = [], 0
    while len(windows) < nsamples:
        index = rng.randint(0, len(texts) - 1)
        if index not in tokenized:
            tokenized[index] = tokenizer(texts[index]).input_ids
        tokens = tokenized[index]
        if len(tokens) <= seqlen:
            failures += 1
            if failures > 50 * len(texts):
                return None
            continue
        failures = 0
        start = rng.randint(0, len(tokens) - seqlen - 1)
        windows.append(tokens[start : start + seqlen])
    return windows


def _windows_from_stream(tokenizer, source, texts, nsamples, seqlen, rng) -> list[list[int]]:
    stream = token_stream(tokenizer, texts)[0].tolist()
    if len(stream) <= seqlen:
        raise BadInput(
            f"calibration source '{source}' has {len(stream)} tokens, fewer than one window of {seqlen}: "
            "use a larger source or a smaller --seqlen"
        )
    if nsamples * seqlen > len(stream):
        raise BadInput(
            f"calibration source '{source}' has {len(stream)} tokens, fewer than nsamples x seqlen = "
            f"{nsamples * seqlen}: use fewer --nsamples or a larger source"
        )
    windows = []
    for _ in range(nsamples):
        start = rng.randint(0, len(stream) - seqlen - 1)
        windows.append(stream[start : start + seqlen])
    return windows


def _builtin_documents(source: str) -> list[str]:
    from spp_cli.data.builtin_corpus import BUILTIN_CORPORA, SPLITS

    _, _, rest = source.partition(":")
    name, _, split = rest.partition(":")
    split = split or "train"
    if name not in BUILTIN_CORPORA:
        raise BadInput(
            f"unknown builtin corpus '{name}': use one of {', '.join('builtin:' + n for n in BUILTIN_CORPORA)}"
        )
    if split not in SPLITS:
        raise BadInput(f"unknown split '{split}' in '{source}': use one of {', '.join(SPLITS)}")
    return BUILTIN_CORPORA[name]().documents(split)


def _local_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise BadInput(f"data file '{path}' does not exist: check the path")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise BadInput(f"{path}: not UTF-8 text (byte {error.start}): convert the file to UTF-8") from None
    if path.suffix == ".txt":
        return [{"text": content}] if content.strip() else []
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(content.splitlines(), start=1):
            if line.strip():
                records.append(_check_record(_parse_json(line, f"{path} line {number}"), f"{path} line {number}"))
        return records
    data = _parse_json(content, str(path))
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} / {"train": [...]}
    if not isinstance(data, list):
        raise BadInput(f"{path}: expected a JSON list of records: use a list of objects or a .jsonl file")
    return [_check_record(record, f"{path} record {index}") for index, record in enumerate(data, start=1)]


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        line = f" line {error.lineno}" if "line" not in where else ""
        raise BadInput(f"{where}{line}: not valid JSON ({error.msg}): fix or remove that record") from None


def _check_record(record, where: str) -> dict:
    if not isinstance(record, dict) or not any(field in record for field in RECORD_FIELDS):
        raise BadInput(f"{where}: a record needs 'text', 'instruction'/'input'/'output' or 'messages': add one")
    return record


def _online_records(source: str) -> list[dict]:
    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        path, config, split, data_files = name, None, split or "train", None
        hint = "a local .jsonl/.json file with the same records"
    else:
        path, config, split, data_files = ONLINE_SOURCES[source]
        hint = OFFLINE_HINTS[source]
    if is_offline():
        raise BadInput(f"data source '{source}' needs the Hugging Face Hub, but this run is offline: use {hint}")
    try:
        import datasets

        dataset = datasets.load_dataset(path, config, split=split, data_files=data_files)
    except Exception as error:  # network, auth or a missing dataset: all are the user's to fix
        raise BadInput(f"could not load data source '{source}' ({type(error).__name__}): use {hint}") from None
    return [_check_record(dict(row), f"{source} row {index}") for index, row in enumerate(dataset, start=1)]

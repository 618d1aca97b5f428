"""Token perplexity as the pruning papers measure it (spec/pruners.md §3; SparseGPT and Wanda).

The text is tokenized ONCE into one stream [1, L] (so one BOS at the very start), cut into
nsamples = L // seqlen non-overlapping windows (the tail is dropped), and each window is scored on its own,
with no context from the previous one:

    nll_i = CrossEntropy(logits_i[:-1], window_i[1:]).mean() * seqlen      (seqlen - 1 targets per window)
    ppl   = exp(sum_i nll_i / (nsamples * seqlen))

This is *token* perplexity over a concatenated stream. lm-eval's `wikitext` task reports *word* perplexity
per document instead; the two are not comparable (spec/ecosystem.md §3), so every number carries its protocol
and seqlen ("wikitext2 token ppl @2048").

Streams: `wikitext2` (WikiText-2 raw test rows joined with "\\n\\n"), `c4` (SparseGPT's C4 validation protocol:
the first 1100 documents of en/c4-validation.00000-of-00008.json.gz joined with " ", truncated to 256 * seqlen
tokens) and `ppl:SOURCE` (any spp data source, documents joined with "\\n\\n").
"""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from spp_cli.data.sources import read_texts, token_stream
from spp_cli.environment import is_offline
from spp_cli.errors import BadInput, first_line
from spp_cli.eval.hub import download_errors
from spp_cli.eval.placement import input_device
from spp_cli.eval.processes import Processes

PROTOCOL = "token, non-overlapping windows"

WIKITEXT2_FILE = "wikitext-2-raw-v1/test.jsonl"
WIKITEXT2_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
C4_SHARD = "en/c4-validation.00000-of-00008.json.gz"
C4_FILE = "c4/c4-validation.00000-of-00008.json.gz"
C4_DOCUMENTS = 1100
C4_WINDOWS = 256
# task -> (file under --data-dir, what it is)
_LOCAL_FILES = {
    "wikitext2": (WIKITEXT2_FILE, 'WikiText-2 raw test, one {"text"} row per line'),
    "c4": (C4_FILE, f"the allenai/c4 shard {C4_SHARD}"),
}

@torch.inference_mode()
def token_perplexity(
    model: torch.nn.Module,
    stream: torch.LongTensor,
    seqlen: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    on_progress=None,
    label: str = "perplexity windows",
    processes: Processes | None = None,
) -> dict:
    """Perplexity of `model` on `stream` [1, L] in non-overlapping windows of `seqlen` tokens.

    Windows are scored `batch_size` at a time on the model's device; every window is independent (no padding,
    no attention across windows), so the result does not depend on `batch_size` beyond fp32 round-off. The
    cross-entropy is computed in fp32 whatever the model dtype, and the sum over windows in float64.
    `max_windows` scores only the first windows (a quick run, not the paper protocol). Puts the model in eval
    mode. `on_progress(done, total, label)` is called with 0 first and after every batch (windows scored of
    nsamples). Returns {"value", "windows", "seqlen", "protocol", "tokens", "stream_tokens"}: `tokens` are the
    tokens scored (windows × seqlen), `stream_tokens` is L, the whole stream (its tail of L mod seqlen tokens, and
    with `max_windows` every window past the first ones, are not scored).
    With several launched `processes` (eval/processes.py), each scores batches rank, rank + N, ... and reports
    progress on its own share; the windows' losses are gathered and summed in window order on every process, so
    the value is one process's. The inputs go to placement.input_device (a device-mapped model's embedding).
    """
    if stream.dim() != 2 or stream.shape[0] != 1:
        raise ValueError(f"stream must have shape [1, L], got {list(stream.shape)}")
    if seqlen < 2:
        raise BadInput(f"seqlen {seqlen} is too small: use at least 2 tokens per window")
    if batch_size < 1:
        raise BadInput(f"batch size {batch_size} is invalid: use 1 or more windows per forward")
    total_tokens = stream.shape[1]
    nsamples = total_tokens // seqlen
    if nsamples == 0:
        raise BadInput(
            f"the text has {total_tokens} tokens, fewer than one window of seqlen {seqlen}: "
            "use more text or a smaller --seqlen"
        )
    if max_windows is not None:
        nsamples = min(nsamples, max_windows)
    windows = stream[0, : nsamples * seqlen].view(nsamples, seqlen)  # [nsamples, seqlen]

    processes = processes or Processes()
    starts = range(0, nsamples, batch_size)[processes.rank :: processes.world_size]  # this process's batches
    nlls = _window_nlls(model, windows, starts, batch_size, on_progress, label)
    for shard in processes.gather(nlls):  # every process's windows (disjoint), on every process
        nlls |= shard
    nll_sum = 0.0  # Python float = float64: sum_i nll_i, in window order whatever the number of processes
    for index in range(nsamples):
        nll_sum += nlls[index]
    value = math.exp(nll_sum / (nsamples * seqlen))
    return {"value": value, "windows": nsamples, "seqlen": seqlen, "protocol": PROTOCOL, "tokens": nsamples * seqlen,
            "stream_tokens": total_tokens}


def _window_nlls(model: torch.nn.Module, windows: torch.LongTensor, starts: range, batch_size: int, on_progress,
                 label: str) -> dict[int, float]:
    """window index -> nll_i (module docstring) of the windows [nsamples, seqlen] in the batches starting at
    `starts`; on_progress(done, total, label) with 0 first and after every batch (windows of these batches)."""
    model.eval()
    device = input_device(model)
    nsamples, seqlen = windows.shape
    total = sum(min(batch_size, nsamples - start) for start in starts)
    nlls: dict[int, float] = {}
    if on_progress is not None:
        on_progress(0, total, label)
    for start in starts:
        batch = windows[start : start + batch_size].to(device)  # [b, seqlen]
        logits = model(input_ids=batch, use_cache=False).logits  # [b, seqlen, vocab]
        for row in range(batch.shape[0]):
            # mean CE over the seqlen-1 shifted targets of one window, then * seqlen as the reference does
            loss = F.cross_entropy(logits[row, :-1].float(), batch[row, 1:])
            nlls[start + row] = loss.double().item() * seqlen
        del logits
        if on_progress is not None:
            on_progress(len(nlls), total, label)
    return nlls


def check_available(task: str, data_dir: str | os.PathLike | None) -> None:
    """BadInput now if `wikitext2`/`c4` cannot be read: the local file is missing, or offline without data_dir."""
    if task in _LOCAL_FILES:
        if data_dir is not None:
            _local_file(task, data_dir)
        elif is_offline():
            raise BadInput(
                f"{task} needs its data from the Hub, but Hugging Face offline mode is set: "
                f"pass --data-dir DIR with DIR/{_LOCAL_FILES[task][0]}"
            )


def wikitext2_rows(data_dir: str | os.PathLike | None) -> tuple[list[str], str]:
    """The 4358 WikiText-2 raw test rows, empty ones included (joined with "\\n\\n" they are the exact string
    GPTQ/SparseGPT/Wanda tokenize), and their source: DATA_DIR/wikitext-2-raw-v1/test.jsonl, else the Hub."""
    if data_dir is not None:
        path = _local_file("wikitext2", data_dir)
        return _read_jsonl_texts(path), str(path)
    check_available("wikitext2", None)
    name, config, split = WIKITEXT2_HUB
    return _load_hub_texts("wikitext2", name, config, split=split), f"hf:{name}/{config}:{split}"


def c4_stream(tokenizer, seqlen: int, data_dir: str | os.PathLike | None) -> tuple[torch.LongTensor, str]:
    """SparseGPT's C4 validation stream: first 1100 documents joined with " ", truncated to 256 * seqlen tokens.

    From DATA_DIR/c4/c4-validation.00000-of-00008.json.gz when `data_dir` is given, else allenai/c4 online.
    """
    if data_dir is not None:
        path = _local_file("c4", data_dir)
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            texts = []
            for line in handle:
                texts.append(json.loads(line)["text"])
                if len(texts) == C4_DOCUMENTS:
                    break
        source = str(path)
    else:
        check_available("c4", None)
        dataset = _load_hub_texts("c4", "allenai/c4", None, data_files={"validation": C4_SHARD}, split="validation")
        texts, source = dataset[:C4_DOCUMENTS], f"hf:allenai/c4/{C4_SHARD}"
    return token_stream(tokenizer, texts, joiner=" ")[:, : C4_WINDOWS * seqlen], source


def perplexity_stream(task: str, tokenizer, seqlen: int, data_dir=None) -> tuple[torch.LongTensor, str]:
    """The token stream [1, L] for a perplexity task (`wikitext2`, `c4`, `ppl:SOURCE`) and where it came from.

    The text is tokenized in ONE call (data.sources.token_stream), so a BOS appears only at the very start.
    `ppl:SOURCE` takes the documents of data.sources.read_texts(SOURCE) (empty ones dropped) joined with "\\n\\n".
    """
    if task == "wikitext2":
        rows, source = wikitext2_rows(data_dir)
        return token_stream(tokenizer, rows, joiner="\n\n"), source
    if task == "c4":
        return c4_stream(tokenizer, seqlen, data_dir)
    if task.startswith("ppl:"):
        source = task[len("ppl:") :]
        return token_stream(tokenizer, read_texts(source), joiner="\n\n"), source
    raise ValueError(f"not a perplexity task: {task}")


def _read_jsonl_texts(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise BadInput(f"{path} line {number}: expected a JSON object with \"text\" ({error})") from None
    return texts


def _local_file(task: str, data_dir: str | os.PathLike) -> Path:
    relative, what = _LOCAL_FILES[task]
    path = Path(data_dir) / relative
    if not path.is_file():
        raise BadInput(
            f"{task} needs {path} ({what}), which is missing: put it there or point --data-dir at a directory "
            "laid out like shared/data"
        )
    return path


def _load_hub_texts(task: str, name: str, config: str | None, **kwargs) -> list[str]:
    """The "text" column of a Hub dataset, or BadInput saying how to run offline."""
    import datasets

    try:
        return datasets.load_dataset(name, config, **kwargs)["text"]
    except download_errors() as error:
        reason = first_line(error)
        raise BadInput(
            f"{task}: could not load {name} ({reason}): pass --data-dir DIR with DIR/{_LOCAL_FILES[task][0]}"
        ) from None

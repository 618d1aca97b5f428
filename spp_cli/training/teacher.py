"""Which model teaches a distill fine-tune, and whether it can: `--teacher`, else the dense ancestor that the
student's spp.json parent chain records (prune records the model it pruned as its parent; a fine-tune records the
pruned model; the first ancestor without an spp.json is the dense model). A teacher must exist and share the
student's vocabulary (config's vocab_size and the tokenizer files' token -> id table), since the KL compares the
two models' distributions over the same token ids. The checks read config and tokenizer files only (no weights, no
torch); load_teacher then loads it for the stage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from spp_cli.errors import BadInput

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")  # compared in this order, the first both have


def dense_ancestor(model: str) -> str | None:
    """The first ancestor of `model` without an spp.json, following each spp.json's parent path (a hub id or a
    folder that no longer exists ends the walk: it is the answer, checked later); None when `model` has no spp.json
    (nothing records where it came from)."""
    from spp_cli.io.checkpoint import model_manifest, read_manifest

    manifest = model_manifest(model)
    seen: set[str] = set()
    while manifest is not None:
        parent = (manifest.get("parent") or {}).get("path")
        if not parent or parent in seen:
            return None
        seen.add(parent)
        if not Path(parent).is_dir():
            return parent
        manifest = read_manifest(parent)
    return parent if seen else None


def find_teacher(given: str | None, model: str | None, architecture: str | None) -> str | None:
    """The teacher reference: `given` (--teacher), else `model`'s dense ancestor. `model` None is an earlier
    recipe stage's output, not written yet: its chain starts at the recipe's root model `architecture` (itself the
    dense ancestor when it has no spp.json)."""
    from spp_cli.io.checkpoint import model_manifest

    if given is not None:
        return given
    if model is None:
        return architecture if architecture is None or model_manifest(architecture) is None else dense_ancestor(
            architecture)
    return dense_ancestor(model)


def check_teacher(given: str | None, model: str | None, architecture: str | None, *, allow_pickle: bool = False,
                  trust_remote_code: bool = False) -> str:
    """The teacher of a distill stage on `model` (see find_teacher), checked: found, loadable and with the student's
    vocabulary; BadInput (one line naming --teacher as the fix) otherwise. Returns its reference."""
    from spp_cli.preflight import check_model_reference

    student = model if model is not None else architecture
    teacher = find_teacher(given, model, architecture)
    if teacher is None:
        raise BadInput(f"objective distill needs a teacher: '{student}' has no spp.json recording the dense model it "
                       "was pruned from; name one with --teacher PATH")
    label = f"--teacher '{teacher}'" if given is not None else (
        f"the dense ancestor '{teacher}' (from '{student}'s spp.json parent chain)")
    if (teacher.startswith((".", "/", "~")) or Path(teacher).is_absolute()) and not Path(teacher).exists():
        fix = "give an existing model folder or hub id" if given is not None else "name the teacher with --teacher PATH"
        raise BadInput(f"{label} does not exist: {fix}")
    try:
        check_model_reference(teacher, allow_pickle)
    except BadInput as error:
        raise BadInput(f"{label}: {error}") from None
    difference = vocabulary_difference(student, teacher, trust_remote_code)
    if difference:
        raise BadInput(f"{label} has another vocabulary than the student '{student}' ({difference}): distill from a "
                       "teacher with the student's tokenizer, e.g. the dense model it was pruned from")
    return teacher


def vocabulary_difference(student: str, teacher: str, trust_remote_code: bool = False) -> str | None:
    """How the two models' vocabularies differ, in words, or None: config's vocab_size (the logits' width), then
    the first tokenizer file both have (TOKENIZER_FILES): identical bytes, else the same token -> id table."""
    from spp_cli.preflight import model_config

    sizes = [_vocab_size(model_config(name, trust_remote_code)) for name in (student, teacher)]
    if sizes[0] != sizes[1]:
        return f"vocab_size {sizes[1]} against {sizes[0]}"
    for name in TOKENIZER_FILES:
        files = [_tokenizer_file(reference, name) for reference in (student, teacher)]
        if None in files:
            continue
        if _sha256(files[0]) == _sha256(files[1]):
            return None
        if name != "tokenizer.model" and _token_table(files[0]) == _token_table(files[1]):
            return None
        return f"their {name} token tables differ"
    return None  # no tokenizer file to compare: the equal vocab_size is all that can be checked


def _vocab_size(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def _tokenizer_file(model: str, name: str) -> Path | None:
    """`name` in a local model folder (builtin:NAME resolved), or in the Hugging Face cache for a hub id."""
    from spp_cli.io.checkpoint import resolve_model_path

    path = resolve_model_path(model)
    if Path(path).is_dir():
        return Path(path) / name if (Path(path) / name).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, name)
    except Exception:  # not a valid repo id: nothing cached to compare
        return None
    return Path(cached) if isinstance(cached, str) else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _token_table(path: Path):
    """tokenizer.json: its model's vocab and the added tokens (id, content); vocab.json: the whole table."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if path.name != "tokenizer.json":
        return data
    added = sorted((token["id"], token["content"]) for token in data.get("added_tokens") or [])
    return (data.get("model") or {}).get("vocab"), added


def load_teacher(options, model_dir: str, dtype: str, loading: dict) -> tuple:
    """(the teacher of a distill FinetuneStage on `model_dir`, its record). The model: in `dtype` (the student's),
    on the CPU until training places it beside the student. The record: its reference (path, revision,
    manifest_sha256), temperature, weight, parameter count and teacher_memory_mb (its weights' MiB)."""
    from spp_cli.io.checkpoint import load_model, parent_record, read_manifest, resolve_model_path

    reference = find_teacher(options.teacher, model_dir, None)
    teacher, _ = load_model(reference, dtype=dtype, with_tokenizer=False, **loading)
    path = resolve_model_path(reference)
    manifest = read_manifest(path) if Path(path).is_dir() else None
    parameters = list(teacher.parameters())
    return teacher, {
        "teacher": parent_record(path, manifest), "temperature": options.distill_temperature,
        "weight": options.distill_weight, "teacher_parameters": sum(p.numel() for p in parameters),
        "teacher_memory_mb": round(sum(p.numel() * p.element_size() for p in parameters) / 2**20, 3)}

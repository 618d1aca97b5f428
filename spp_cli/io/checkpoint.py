"""Load and save HF checkpoint directories safely, and the spp.json manifest that travels with them.

Saving is atomic: everything is written into a hidden staging directory next to the target and renamed into
place only when complete, so a crash never leaves a directory that looks like a finished checkpoint. A
directory is complete when it holds `spp.json` with a `manifest_sha256` (see `is_complete`).
"""

import hashlib
import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from spp_cli.errors import BadInput, first_line
from spp_cli.io.atomic import atomic_dir

MANIFEST = "spp.json"
ASSETS = Path(__file__).parents[1] / "assets"  # spp_cli/assets
BUILTIN_MODELS = {"tiny-llama": ASSETS / "tiny-llama"}
# left out of manifest_sha256: the timing, the hash itself, and "applied" (what this run resolved: this machine's
# device, the dtypes it computed in, the data format read), so the same run gives the same hash on any machine
UNHASHED_KEYS = ("seconds", "created", "manifest_sha256", "applied")
PARENT_FILES = ("generation_config.json", "chat_template.jinja", "chat_template.json")


def resolve_model_path(name: str) -> str:
    """`builtin:NAME` -> the packaged directory; anything else unchanged."""
    if name.startswith("builtin:"):
        key = name.split(":", 1)[1]
        if key not in BUILTIN_MODELS:
            raise BadInput(
                f"unknown builtin model '{name}': use one of {', '.join('builtin:' + k for k in BUILTIN_MODELS)}"
            )
        if not (BUILTIN_MODELS[key] / "config.json").exists():
            raise BadInput(f"builtin model '{name}' is missing from the package: reinstall spp (pip install -e .)")
        return str(BUILTIN_MODELS[key])
    return name


def check_model_dir(path: Path, allow_pickle: bool) -> None:
    """One clear line for the usual ways a local model directory is unusable."""
    if not path.is_dir():
        raise BadInput(f"model directory '{path}' does not exist: check the path (or give a hub id like org/name)")
    if not (path / "config.json").is_file():
        raise BadInput(f"'{path}' has no config.json: point at a directory written by save_pretrained")
    has_safetensors = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin"))
    if not has_safetensors and not has_pickle:
        raise BadInput(f"'{path}' has a config but no weights (*.safetensors): copy the weight files there")
    if not has_safetensors and not allow_pickle:
        raise BadInput(
            f"'{path}' has only pickle .bin weights, which can run code when loaded: "
            "pass --allow-pickle if you trust them"
        )
    for weights in path.glob("*.safetensors"):
        _check_safetensors(weights)


def _check_safetensors(path: Path) -> None:
    """A truncated or corrupt file fails here with one line instead of deep inside transformers."""
    from spp_cli.io.safetensors_header import read_header

    size = path.stat().st_size
    try:
        header, data_start = read_header(path)
    except (OSError, ValueError):
        raise BadInput(f"'{path}' is not a readable safetensors file: re-download or re-save it") from None
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if data_start + end > size:
        raise BadInput(
            f"'{path}' is truncated ({size} bytes, needs {data_start + end}): re-download or re-save it"
        )


def check_model(path_or_id: str, allow_pickle: bool = False) -> str:
    """Resolve `builtin:NAME` and check a local directory up front (one line on failure); hub ids pass as they are."""
    path = resolve_model_path(path_or_id)
    if Path(path).exists() or path.startswith((".", "/")) or path.count("/") != 1:
        check_model_dir(Path(path), allow_pickle)
    return path


def torch_dtype(name: str):
    if name in (None, "auto"):
        return "auto"
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise BadInput(f"unknown dtype '{name}': use auto, float32, bfloat16 or float16") from None


def load_model(
    path_or_id: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    with_tokenizer: bool = True,
    placement: dict | None = None,
):
    """(model, tokenizer) from a local directory, `builtin:NAME`, or a hub id. Only safetensors unless allowed.

    placement: from_pretrained's {"device_map", "max_memory", "offload_folder"} (accelerate's big-model inference,
    spp_cli/eval/placement.py), which then places the model instead of `device`.

    with_tokenizer=False returns (model, None): transformers 5 builds a tokenizer in Python from tokenizer.json, 5-8 s
    for Gemma 3's 262k-token vocabulary, so a caller that does not use it should not load it.
    """
    from transformers import AutoModelForCausalLM

    path = check_model(path_or_id, allow_pickle)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(dtype), use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code, **(placement or {}),
        )
    except (OSError, ValueError) as error:
        raise BadInput(f"could not load model '{path_or_id}': {first_line(error)}") from None
    tokenizer = load_tokenizer(path, trust_remote_code) if with_tokenizer else None
    model.eval()
    model.spp_stored_dtype = stored_dtype(path, model, trust_remote_code)
    return (model if placement else model.to(device)), tokenizer


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """A model folder's tokenizer (one line on failure): the one place spp loads a tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise BadInput(f"could not load the tokenizer of '{path}': {first_line(error)}") from None


def stored_dtype(path: str, model, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype the checkpoint is stored in (what a stage saves back), whatever dtype it computes in."""
    name = config_dtype_name(path, trust_remote_code)
    stored = getattr(torch, name, None) if name else None
    return stored if isinstance(stored, torch.dtype) else next(model.parameters()).dtype


def config_dtype_name(path: str, trust_remote_code: bool = False) -> str | None:
    """The checkpoint's dtype from its config ("dtype" or "torch_dtype"): a local config.json, else a hub id's
    config (cached, or fetched when online); None when unknown."""
    config_file = Path(path) / "config.json"
    try:
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).to_dict()
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    return str(name).removeprefix("torch.") if name else None


def read_manifest(model_dir: str | Path) -> dict | None:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise BadInput(f"'{path}' is not valid JSON: restore it or rerun the stage with --overwrite") from None


def model_manifest(model: str) -> dict | None:
    """The spp.json of a model reference (a local folder or builtin:NAME), None for a hub id or a plain model."""
    path = resolve_model_path(model)
    return read_manifest(path) if Path(path).is_dir() else None


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def is_complete(directory: str | Path) -> bool:
    manifest = read_manifest(directory) if Path(directory).is_dir() else None
    return bool(manifest and manifest.get("manifest_sha256"))


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the manifest's content: UNHASHED_KEYS (`seconds`, `created`, the hash itself, `applied`) and the
    parent's (and a distill teacher's) *location* are left out, so identical runs give identical hashes wherever
    they are written."""
    content = {key: value for key, value in manifest.items() if key not in UNHASHED_KEYS}
    if isinstance(content.get("parent"), dict):
        content["parent"] = {key: value for key, value in content["parent"].items() if key != "path"}
    if isinstance(content.get("distillation"), dict) and isinstance(content["distillation"].get("teacher"), dict):
        teacher = {key: value for key, value in content["distillation"]["teacher"].items() if key != "path"}
        content["distillation"] = {**content["distillation"], "teacher": teacher}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parent_record(parent: str, parent_manifest: dict | None) -> dict:
    revision = None
    if not Path(parent).exists() and parent.count("/") == 1:
        revision = _hub_revision(parent)
    return {
        "path": str(Path(parent).resolve()) if Path(parent).exists() else parent,
        "revision": revision,
        "manifest_sha256": parent_manifest.get("manifest_sha256") if parent_manifest else None,
    }


def _hub_revision(repo_id: str) -> str | None:
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_id == repo_id:
                return max(repo.revisions, key=lambda revision: revision.last_modified).commit_hash
    except Exception:  # the cache is optional provenance, never a reason to fail a stage
        return None
    return None


def finish_manifest(manifest: dict, seconds: float) -> dict:
    """Add `manifest_sha256`, `seconds` and `created` to a manifest whose content is final."""
    manifest = dict(manifest)
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    manifest["seconds"] = round(seconds, 2)
    manifest["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    return manifest


def parent_shard_size(parent_dir: Path | None) -> str:
    """Keep the parent's shard layout: shards no larger than the parent's largest shard."""
    if parent_dir is None or not parent_dir.is_dir():
        return "5GB"
    sizes = [path.stat().st_size for path in parent_dir.glob("*.safetensors")]
    if len(sizes) <= 1:
        return "1000GB"
    return f"{max(sizes) // 1_000_000 + 1}MB"


def save_checkpoint(
    model,
    tokenizer,
    out_dir: str | Path,
    manifest: dict,
    *,
    parent_dir: str | Path | None = None,
    started: float | None = None,
    extra_dirs: dict[str, Path] | None = None,
) -> dict:
    """Write model + tokenizer + spp.json atomically to `out_dir`; return the finished manifest.

    `extra_dirs` maps a subdirectory name (e.g. "adapter") to an existing directory to move in with it.
    """
    parent_dir = Path(parent_dir) if parent_dir else None
    with atomic_dir(out_dir) as staging:
        model.save_pretrained(staging, max_shard_size=parent_shard_size(parent_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name in PARENT_FILES:
            if parent_dir is not None and (parent_dir / name).is_file() and not (staging / name).exists():
                shutil.copy2(parent_dir / name, staging / name)
        for name, source in (extra_dirs or {}).items():
            shutil.copytree(source, staging / name)
        finished = finish_manifest(manifest, time.time() - started if started else 0.0)
        write_manifest(staging, finished)
    return finished


DEFAULT_MAX_SEQLEN = 2048  # spec/pruners.md §6 pitfall 4: never default to a 128k max_position_embeddings


def max_positions(config) -> int | None:
    """The model's position limit (max_position_embeddings, n_positions or n_ctx), or None if it has none."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_seqlen(config, seqlen: int | None) -> int:
    """The one seqlen rule of every stage: default min(2048, the model's position limit); BadInput beyond that
    limit or below 2 tokens."""
    limit = max_positions(config)
    if seqlen is None:
        return min(DEFAULT_MAX_SEQLEN, limit) if limit else DEFAULT_MAX_SEQLEN
    if seqlen < 2:
        raise BadInput(f"--seqlen {seqlen} is too small: use at least 2")
    if limit is not None and seqlen > limit:
        raise BadInput(f"--seqlen {seqlen} exceeds the model's {limit} positions: use --seqlen {limit} or less")
    return seqlen

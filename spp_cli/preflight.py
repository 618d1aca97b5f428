"""Checks that need no model weights, made before any heavy work by the stages and by `spp run --dry-run`:
every output can be written, every data source is readable (and reachable offline), every model reference
resolves, an optional logger is installed, and SPP's row groups divide every layer it will adapt.

Each check raises BadInput (one line naming the problem and the fix) and has no other effect.
"""

import importlib.util
import os
from pathlib import Path

from spp_cli.errors import BadInput


def check_writable(out: str | Path) -> None:
    """`out` can be created: its nearest existing folder takes a new entry (tried for real, so a read-only
    filesystem fails here even for root, not after the work)."""
    out = Path(out).absolute()
    folder = out.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise BadInput(f"cannot write '{out}': '{folder}' is a file, not a folder; choose another --out")
    probe = folder / f".spp-write-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as error:
        raise BadInput(f"cannot write '{out}': {error.strerror} in '{folder}'; choose an --out you can write") from None


def check_source(source: str) -> None:
    """A data SOURCE reads (local file present and valid, builtin corpus known, online name reachable)."""
    from spp_cli.data.sources import read_records

    read_records(source)


def check_model_reference(model: str, allow_pickle: bool = False) -> None:
    """A local folder is a usable checkpoint; a hub id needs the network unless it is in the local cache."""
    from spp_cli.checkpoint import check_model
    from spp_cli.environment import is_offline

    path = check_model(model, allow_pickle)
    if Path(path).exists() or not is_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(path, "config.json"), str):
        raise BadInput(f"model '{model}' is not a local folder and not in the Hugging Face cache, and this run is "
                       "offline: download it first (huggingface-cli download) or give its local folder")


LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_report_to(report_to: str) -> None:
    package = LOGGER_PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise BadInput(f"--report-to {report_to} needs the '{package}' package: pip install {package}, "
                       "or use --report-to none")


def check_groups_divide(model: str, groups: int, targets: str | None = None, ignore: str | None = None,
                        trust_remote_code: bool = False) -> None:
    """SPP shares alpha across `groups` contiguous row groups, so every adapted linear's out_features must be a
    multiple of `groups`. Checked on the architecture alone (a weightless skeleton on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pruners.blocks import prunable_linears
    from spp_cli.checkpoint import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    rows = {name: linear.out_features for name, linear in prunable_linears(skeleton, targets, ignore).items()}
    misfit = next((name for name, count in rows.items() if count % groups), None)
    if misfit is not None:
        fits = max(g for g in range(1, groups + 1) if all(count % g == 0 for count in rows.values()))
        raise BadInput(f"groups {groups} does not divide {misfit}'s {rows[misfit]} output rows: use groups {fits} "
                       "(the largest that divides every adapted layer)")

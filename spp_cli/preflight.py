"""Checks that need no model weights, made before any heavy work by the stages and by `spp run --dry-run`:
every output can be written, every data source is readable (and reachable offline), every model reference
resolves, an optional logger is installed, SPP's row groups divide every layer it will adapt, and a distill
fine-tune has a teacher with the student's vocabulary.

Each check raises BadInput (one line naming the problem and the fix) and has no other effect. The stage checks at
the end (`check_prune`, `check_finetune`, `check_eval`) are the one list of what a stage verifies before it loads any
weights; the stage functions call them (so the commands and the Python API run them) and so does `spp run` for
every stage before the first one starts (`--dry-run` runs them alone).
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
    from spp_cli.environment import is_offline
    from spp_cli.io.checkpoint import check_model

    path = check_model(model, allow_pickle)
    if Path(path).exists() or not is_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(path, "config.json"), str):
        raise BadInput(f"model '{model}' is not a local folder and not in the Hugging Face cache, and this run is "
                       "offline: download it first (huggingface-cli download) or give its local folder")


LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_report_to(report_to: str | None) -> None:
    """An optional logger's package is installed (Trainer's callbacks only find out after the model loads)."""
    package = LOGGER_PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise BadInput(f"--report-to {report_to} needs the '{package}' package: pip install {package}, "
                       "or use --report-to none")


def check_groups_divide(model: str, groups: int | None, targets: str | None = None, ignore: str | None = None,
                        trust_remote_code: bool = False, names: set[str] | None = None) -> None:
    """SPP shares alpha across `groups` contiguous row groups, so every adapted linear's out_features must be a
    multiple of `groups` (None: SPP's default). Checked on the architecture alone (a weightless skeleton on the
    meta device); `names`, when given, are the only layers adapted."""
    from spp_cli.adapters import resolved_method_options

    groups = resolved_method_options("spp", {"groups": groups})["groups"]
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pruners.blocks import prunable_linears
    from spp_cli.io.checkpoint import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    rows = {name: linear.out_features for name, linear in prunable_linears(skeleton, targets, ignore).items()
            if names is None or name in names}
    misfit = next((name for name, count in rows.items() if count % groups), None)
    if misfit is not None:
        fits = max(g for g in range(1, groups + 1) if all(count % g == 0 for count in rows.values()))
        raise BadInput(f"groups {groups} does not divide {misfit}'s {rows[misfit]} output rows: use groups {fits} "
                       "(the largest that divides every adapted layer)")


def model_config(model: str, trust_remote_code: bool = False):
    """The model's config alone (config.json: no weights are read)."""
    from transformers import AutoConfig

    from spp_cli.io.checkpoint import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(model), trust_remote_code=trust_remote_code)


def check_seqlen(model: str, seqlen: int | None, trust_remote_code: bool = False) -> None:
    """An explicit seqlen fits the model's positions (a longer window would run, slowly and wrongly)."""
    if seqlen is None:
        return
    from spp_cli.io.checkpoint import resolve_seqlen

    resolve_seqlen(model_config(model, trust_remote_code), seqlen)


def check_prune(stage, model: str | None, *, architecture: str | None = None, allow_pickle: bool = False,
                trust_remote_code: bool = False) -> None:
    """A validated PruneStage on `model` (None: an earlier stage's output, not written yet), whose architecture is
    that of `architecture` (default `model`)."""
    if model is not None:
        if stage.streaming == "on":
            from spp_cli.io.checkpoint import resolve_model_path
            from spp_cli.stages.prune_streaming import wants_streaming

            wants_streaming("on", resolve_model_path(model))  # a local safetensors folder, or BadInput
        check_model_reference(model, allow_pickle)
    if stage.method != "magnitude" or stage.sparsity_profile == "owl" or stage.refine.endswith("reconstruct"):
        # only these read calibration windows
        check_source(stage.calib)
        check_seqlen(architecture or model, stage.seqlen, trust_remote_code)


def check_finetune(stage, model: str | None, *, architecture: str | None = None, adapted: dict | None = None,
                   allow_pickle: bool = False, trust_remote_code: bool = False) -> None:
    """A validated FinetuneStage on `model` (None: not written yet; `architecture` stands for it). `adapted`
    narrows the layers SPP's row groups must divide: {"targets", "ignore"} regexes of the stage that pruned it;
    without it, the layers `model`'s spp.json lists (or every prunable linear)."""
    from spp_cli.adapters import method_named

    if model is not None:
        check_model_reference(model, allow_pickle)
    check_source(stage.data)
    check_report_to(stage.report_to)
    if stage.eval_ppl_source is not None:  # the recovery curve's perplexity source
        check_ppl_source(stage.eval_ppl_source, stage.eval_data_dir)
    architecture = architecture or model
    check_seqlen(architecture, stage.seqlen, trust_remote_code)
    groups = method_named(stage.method).options.get("groups")  # None: the method has no row groups
    if groups is not None:
        narrowing = adapted if adapted is not None else {"names": _pruned_layer_names(model)}
        check_groups_divide(architecture, stage.groups or groups, trust_remote_code=trust_remote_code, **narrowing)
    if stage.objective == "distill":  # the teacher: found, present, with the student's vocabulary
        from spp_cli.training.teacher import check_teacher

        check_teacher(stage.teacher, model, architecture, allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code)


def check_ppl_source(task: str, data_dir: str | None) -> None:
    """A perplexity task (wikitext2, c4, ppl:SOURCE) reads: from `data_dir` when given, else offline-reachable."""
    from spp_cli.eval.engine import validate_tasks

    if data_dir is not None and not Path(data_dir).is_dir():
        raise BadInput(f"'{data_dir}' is not a directory: point it at a folder laid out like shared/data")
    validate_tasks([task], data_dir=data_dir)


def check_eval(stage, models: dict[str, str | None], *, architectures: dict[str, str] | None = None,
               allow_pickle: bool = False, trust_remote_code: bool = False) -> None:
    """A validated EvalStage on `models` (name -> reference, None: not written yet; `architectures` stands for
    those). Every model is checked before the first is evaluated."""
    from spp_cli.eval.engine import validate_tasks

    if stage.data_dir is not None and not Path(stage.data_dir).is_dir():
        raise BadInput(f"--data-dir '{stage.data_dir}' is not a directory: point it at a folder laid out like "
                       "shared/data")
    validate_tasks(stage.tasks, data_dir=stage.data_dir)
    if stage.device_map is not None:
        check_device_map(stage)
    for name, model in models.items():
        if model is not None:
            check_model_reference(model, allow_pickle)
        check_seqlen((architectures or {}).get(name) or model, stage.seqlen, trust_remote_code)


def check_device_map(stage) -> None:
    """A device map runs in one process, on GPUs this machine has, with an offload folder it can write."""
    from spp_cli.eval.placement import gpu_budgets
    from spp_cli.eval.processes import launched_processes

    if launched_processes().world_size > 1:
        raise BadInput("--device-map spreads one model over the devices, but this is one of several launched "
                       "processes, each holding a whole model: drop --device-map, or run one process")
    gpus = gpu_budgets(stage.max_memory)
    if gpus:
        import torch

        count = torch.cuda.device_count()
        if max(gpus) >= count:
            have = f"GPUs 0-{count - 1}" if count > 1 else "GPU 0" if count else "no GPU"
            raise BadInput(f"--max-memory names GPU {max(gpus)}, but this machine has {have}: name only the GPUs "
                           "it has, or give cpu=SIZE alone")
    folder = stage.offload_folder
    if folder is not None:
        if Path(folder).exists() and not Path(folder).is_dir():
            raise BadInput(f"--offload-folder '{folder}' is a file: give a folder (spp makes a scratch folder in it)")
        try:
            check_writable(Path(folder) / "spp-offload")
        except BadInput:
            raise BadInput(f"cannot write in --offload-folder '{folder}': choose a folder you can write") from None


def _pruned_layer_names(model: str | None) -> set[str] | None:
    """The layers an adapter will wrap, from the model's spp.json (None: no spp.json, every prunable linear)."""
    from spp_cli.io.checkpoint import model_manifest

    manifest = model_manifest(model) if model is not None else None
    return set(manifest["layers"]) if manifest and manifest.get("layers") else None

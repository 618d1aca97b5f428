"""Zero-shot tasks through lm-eval's Python API, with the model already in memory, online or from local files.

Online, task names are lm-eval's own (boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa,
piqa, its `wikitext` word perplexity, any other task it knows) and lm-eval downloads their datasets.

Offline (`data_dir`), the eight tasks of BUNDLE_TASKS run from local files laid out like shared/data, through
the task bundle in spp_cli/eval/tasks/: lm-eval YAMLs with the same names, metrics and prompts as the built-in tasks,
whose data paths are made absolute and written to a temporary directory at run time (`render_bundle`).

HellaSwag caveat: the local hellaswag file (shared/data/SOURCES.md) was extracted by klosax, not by lm-eval's
`process_docs`: the first word of ctx_b is not capitalized ("... on a roof. he" where lm-eval has "He") and
18 of 10042 lines keep [bracketed] text that lm-eval deletes. Offline hellaswag scores are therefore close
to, but not bit-identical with, lm-eval's `hellaswag`; results.json says so in results["hellaswag"]["note"]
and in "notes" (the text comes from hellaswag.yaml's `metadata.spp_note`). BoolQ likewise: the local passages
lack SuperGLUE's "Title -- " prefix (boolq.yaml's spp_note). results.json's "sources" says, per task, which task
file and data each number used and whether its prompt equals lm-eval's (tasks/README.md).

BOS (`bos`): lm-eval 0.4.13's HFLM leaves BOS to the tokenizer's default (add_bos_token=None: LLaMA's and Gemma's
tokenizers prepend it), while the Wanda/SPP harness (lm-eval fork df3da98, `hf-causal-experimental`) encodes
with add_special_tokens=False, i.e. without BOS. BOS_RULES: "auto" = lm-eval's default, "yes" =
add_bos_token=True (the tokenizer's special tokens), "no" = add_bos_token=False (the papers' harness).
`bos_record` says what the rule did with the model's tokenizer; results.json stores it.
"""

from __future__ import annotations

import copy
import functools
import os
import tempfile
from pathlib import Path

import yaml

from spp_cli.errors import BadInput, first_line
from spp_cli.eval.hub import download_errors
from spp_cli.eval.placement import input_device
from spp_cli.eval.processes import Processes
from spp_cli.eval.quiet import quiet_lm_eval
from spp_cli.io.atomic import write_text_atomic
from spp_cli.vocabulary import BOS_RULES

BUNDLE_DIR = Path(__file__).parent / "tasks"
BUNDLE_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")
# The seven tasks Wanda and SPP report; mean_acc_7 is the mean of their `acc` (not acc_norm).
MEAN_ACC_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
_ADD_BOS_TOKEN = {"auto": None, "yes": True, "no": False}  # bos rule -> HFLM(add_bos_token=...)
assert tuple(_ADD_BOS_TOKEN) == BOS_RULES
BUILTIN_SOURCE = {"task_file": "lm-eval built-in", "data": "the Hub or the datasets cache", "prompt": "lm-eval's own"}


def bundle_templates(task: str) -> list[Path]:
    """The bundle's YAMLs for `task`: `<task>.yaml` first, then its `<task>.<variant>.yaml` alternatives."""
    return [BUNDLE_DIR / f"{task}.yaml", *sorted(BUNDLE_DIR.glob(f"{task}.*.yaml"))]


def render_bundle_task(task: str, data_dir: str | os.PathLike) -> dict:
    """The lm-eval config of one bundle task with absolute data paths (the first variant whose files exist).

    Raises BadInput naming the missing file and --data-dir when no variant's files are in `data_dir`.
    """
    data_dir = Path(data_dir).resolve()
    missing = []
    for template in bundle_templates(task):
        config = yaml.safe_load(template.read_text(encoding="utf-8"))
        data_files = config["dataset_kwargs"]["data_files"]
        absolute = {split: data_dir / relative for split, relative in data_files.items()}
        absent = [str(path) for path in absolute.values() if not path.is_file()]
        if not absent:
            config["dataset_kwargs"]["data_files"] = {split: str(path) for split, path in absolute.items()}
            config["metadata"]["spp_task_file"] = f"spp_cli/eval/tasks/{template.name}"
            return config
        missing += absent
    raise BadInput(
        f"{task} needs {' or '.join(missing)}, which is missing: point --data-dir at a directory laid out "
        "like shared/data (see its SOURCES.md)"
    )


def render_bundle(tasks: list[str], data_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, dict]:
    """Write `out_dir/<task>.yaml` for each of `tasks` (absolute data paths); returns {task: config written}.

    Usable with `TaskManager(include_path=out_dir)` or `lm_eval --include_path out_dir`: the tasks keep the
    built-in names and override the built-in tasks.
    """
    configs = {}
    for task in tasks:
        configs[task] = render_bundle_task(task, data_dir)
        text = yaml.safe_dump(configs[task], sort_keys=False, allow_unicode=True)
        (Path(out_dir) / f"{task}.yaml").write_text(text, encoding="utf-8")
    return configs


@functools.cache
def default_task_manager():
    """lm-eval's TaskManager over its built-in tasks (indexing ~15k YAMLs takes seconds, so built once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@functools.cache
def lm_eval_task_names() -> list[str]:
    """Every task, group and tag name lm-eval knows. Indexing its ~15k YAMLs takes 5-15 s, so the names are kept
    in spp's cache folder ($SPP_CACHE, default ~/.cache/spp) per lm-eval version and task folder: a bad task name
    is then refused in well under a second after the first lookup on a machine."""
    import json

    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    key = f"{lm_eval.__version__}-{tasks_dir.stat().st_mtime_ns}"
    cache = Path(os.environ.get("SPP_CACHE", os.path.expanduser("~/.cache/spp"))) / "lm-eval-task-names.json"
    try:
        stored = json.loads(cache.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            return stored["names"]
    except (OSError, ValueError, AttributeError):
        pass
    names = list(default_task_manager().all_tasks)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache, json.dumps({"key": key, "names": names}))
    except OSError:
        pass  # a read-only home only costs the next lookup its seconds
    return names


def check_bos_rule(bos: str) -> None:
    """BadInput unless `bos` is one of BOS_RULES."""
    if bos not in BOS_RULES:
        raise BadInput(f"--bos {bos!r} is unknown: use one of {', '.join(BOS_RULES)}")


def bos_record(tokenizer, bos: str) -> dict:
    """What a BOS rule does with `tokenizer`, encoding as lm-eval's HFLM.tok_encode does:
    {"rule": bos, "lm_eval_add_bos_token": None | bool, "prepends_bos": bool}."""
    add_bos_token = _ADD_BOS_TOKEN[bos]
    kwargs = {} if add_bos_token is None else {"add_special_tokens": add_bos_token}
    ids = tokenizer.encode("Question:", **kwargs)
    prepends = tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
    return {"rule": bos, "lm_eval_add_bos_token": add_bos_token, "prepends_bos": prepends}


def run_zeroshot(
    model,
    tokenizer,
    tasks: list[str],
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    bos: str = "auto",
    on_progress=None,
    verbose: bool = False,
    processes: Processes | None = None,
) -> dict:
    """Run lm-eval zero-shot `tasks` on an in-memory HF model; bundle tasks come from `data_dir` when given.

    Names must already be validated (evaluate.validate_tasks). The model stays on its device (lm-eval takes
    `model.device`) and is put in eval mode; the tokenizer is copied, because lm-eval sets a pad token on it.
    bos: a BOS_RULES entry (module docstring). Tasks run one at a time so that `on_progress(done, total, label)`
    is called before each ("zero-shot boolq", done = tasks finished) and once at the end (total, total), and
    within a task as its model requests run ("zero-shot boolq requests", done of total requests).
    lm-eval's logging, tqdm bars and git lookup are silenced unless `verbose` (spp_cli.eval.quiet).
    Returns {"results", "n-samples", "task_versions", "sources", "bos", "notes"}, results in lm-eval's layout
    ({task: {"alias", "acc,none", "acc_stderr,none", ...}}), sources {task: {"task_file", "data", "prompt"}}.
    Several launched `processes` (eval/processes.py): lm-eval shards the requests, rank 0 alone gets "results".
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    check_bos_rule(bos)
    bundle = [task for task in tasks if data_dir is not None and task in BUNDLE_TASKS]
    online = [task for task in tasks if task not in bundle]
    results, n_samples, task_versions = {}, {}, {}
    running = [""]  # the task whose requests lm-eval is running

    def on_requests(done: int, total: int) -> None:
        if on_progress is not None:
            on_progress(done, total, f"zero-shot {running[0]} requests")

    with tempfile.TemporaryDirectory(prefix="spp-tasks-") as tmp, quiet_lm_eval(verbose, on_requests):
        configs = render_bundle(bundle, data_dir, tmp) if bundle else {}
        task_manager = default_task_manager() if online else TaskManager(include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size,
                  add_bos_token=_ADD_BOS_TOKEN[bos])
        _place(lm, model, processes or Processes())
        for done, task in enumerate(tasks):
            running[0] = task
            if on_progress is not None:
                on_progress(done, len(tasks), f"zero-shot {task}")
            # a bundle task goes in as a YAML path, so a bundle-only run never indexes lm-eval's 15k YAMLs
            spec = str(Path(tmp) / f"{task}.yaml") if task in configs else task
            try:
                output = lm_eval.simple_evaluate(
                    model=lm, tasks=[spec], num_fewshot=0, limit=limit, log_samples=False, task_manager=task_manager
                )
            except download_errors() as error:
                raise BadInput(_download_failure(error, online)) from None
            if output is None:  # a rank other than 0: lm-eval gathered its metrics on rank 0
                continue
            results |= output["results"]
            n_samples |= output["n-samples"]
            task_versions |= output["versions"]
        if on_progress is not None and tasks:
            on_progress(len(tasks), len(tasks), f"zero-shot {tasks[-1]}")
    sources, notes = _sources_and_notes(online, configs, results)
    return {
        "results": results,
        "n-samples": n_samples,
        "task_versions": task_versions,
        "sources": sources,
        "bos": bos_record(tokenizer, bos),
        "notes": notes,
    }


def _sources_and_notes(online: list[str], configs: dict[str, dict], results: dict) -> tuple[dict, list[str]]:
    """Which task file, data and prompt each task used, and the bundle's notes (also put on `results`' tasks)."""
    notes = []
    sources = {task: dict(BUILTIN_SOURCE) for task in online}
    for task, config in configs.items():
        metadata = config.get("metadata", {})
        sources[task] = {"task_file": metadata["spp_task_file"],
                         "data": ", ".join(config["dataset_kwargs"]["data_files"].values()),
                         "prompt": metadata.get("spp_prompt", "")}
        if note := metadata.get("spp_note"):  # e.g. hellaswag's preprocessing, boolq's missing titles
            if task in results:  # not on a rank other than 0
                results[task]["note"] = note
            notes.append(f"{task}: {note}")
    return sources, notes


def _place(lm, model, processes: Processes) -> None:
    """What lm-eval's HFLM skips for a model passed in memory: the inputs' device of a device-mapped model (its
    `model.device` can be the meta device of an offloaded weight), and data parallelism under several launched
    processes (HFLM shards requests by `rank` and gathers with `accelerator`, as when it loads the model itself)."""
    if getattr(model, "hf_device_map", None) is not None:
        lm._device = input_device(model)
    if processes.world_size > 1:
        lm._rank, lm._world_size = processes.rank, processes.world_size
        lm.accelerator = processes.accelerator(cpu=lm.device.type == "cpu")


# the Hub datasets lm-eval's built-in YAMLs read for the bundle's tasks (lm_eval/tasks/*/: dataset_path)
HUB_DATASETS = {"boolq": "aps/super_glue", "rte": "nyu-mll/glue", "hellaswag": "Rowan/hellaswag",
                "winogrande": "allenai/winogrande", "arc_easy": "allenai/ai2_arc", "arc_challenge": "allenai/ai2_arc",
                "openbookqa": "allenai/openbookqa", "piqa": "baber/piqa"}


def check_reachable_offline(tasks: list[str]) -> None:
    """Offline without --data-dir, a bundle task whose Hub dataset is in no local cache would fail inside lm-eval
    after the model is loaded: refuse it now, naming the local file that --data-dir would supply."""
    from datasets import config as datasets_config
    from huggingface_hub import constants

    for task in tasks:
        repo = HUB_DATASETS.get(task)
        if repo is None:
            continue
        org, name = repo.split("/")
        cached = [Path(constants.HF_HUB_CACHE) / f"datasets--{org}--{name}",
                  Path(datasets_config.HF_DATASETS_CACHE) / f"{org}___{name}"]
        if not any(path.exists() for path in cached):
            raise BadInput(f"{task} needs the dataset {repo} from the Hub, but this run is offline and it is not "
                           f"cached: pass --data-dir DIR with DIR/{_primary_data_file(task)}")


def _download_failure(error: Exception, online: list[str]) -> str:
    """One line for a dataset lm-eval could not fetch: the local files that --data-dir would supply instead."""
    reason = first_line(error)
    local = [f"DIR/{_primary_data_file(task)}" for task in online if task in BUNDLE_TASKS]
    if local:
        return f"lm-eval could not download a dataset ({reason}): pass --data-dir DIR with {', '.join(local)}"
    return (
        f"lm-eval could not download a dataset ({reason}): {', '.join(online)} need the network or the datasets "
        f"cache; only {', '.join(BUNDLE_TASKS)} run from --data-dir"
    )


def _primary_data_file(task: str) -> str:
    """The data file of `<task>.yaml`, relative to the data directory (e.g. boolq/boolq.jsonl)."""
    config = yaml.safe_load(bundle_templates(task)[0].read_text(encoding="utf-8"))
    return ", ".join(config["dataset_kwargs"]["data_files"].values())


def mean_acc_7(results: dict) -> float | None:
    """Mean `acc` over MEAN_ACC_TASKS (Wanda's and SPP's seven tasks); None unless all seven are present."""
    values = [results.get(task, {}).get("acc,none") for task in MEAN_ACC_TASKS]
    if any(value is None for value in values):
        return None
    return float(sum(values) / len(values))

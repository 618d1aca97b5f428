"""The `spp` command line: parse, call the library, print. Heavy imports live inside the commands so that
`spp --help` answers at once; every failure becomes one line on stderr and an exit code (DESIGN.md)."""

import contextlib
import inspect
import json
import os
import sys
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from spp_cli import error_output, interrupts
from spp_cli.cli_options import parameter, schema_choices, schema_command, schema_parameter
from spp_cli.recipe.resolve import validate_options
from spp_cli.recipe.schema import EvalStage, FinetuneStage, PruneStage, Recipe, schema_fields

try:  # recent Typer vendors its own Click; older releases use the click package
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover
    from click import get_current_context

class _FlagHelp:
    """`--help` is a flag: no `<bool>` after it in the help text (like every other flag of spp)."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class SppCommand(_FlagHelp, typer.core.TyperCommand):
    pass


class SppGroup(_FlagHelp, typer.core.TyperGroup):
    pass


app = typer.Typer(
    name="spp",
    cls=SppGroup,
    help="Prune a Hugging Face causal LM one-shot, recover it with SPP (sparsity-preserving PEFT), evaluate it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


class OutputFormat(StrEnum):
    human = "human"
    json = "json"


def _recipe_flag(key: str) -> inspect.Parameter:
    """A top-level recipe key that commands take as a flag (--trust-remote-code, --allow-pickle)."""
    return schema_parameter(next(f for f in schema_fields(Recipe) if f.name == key))


FORMAT = parameter("output_format", OutputFormat, typer.Option("--format", help="human tables, or JSON for scripts."),
                   OutputFormat.human)
OVERWRITE_HELP = "Replace an output that spp wrote earlier with other options (never anything else)."
OVERWRITE = parameter("overwrite", bool, typer.Option("--overwrite", help=OVERWRITE_HELP, metavar="",
                                                      show_default=False), False)
LOADING = [_recipe_flag("trust_remote_code"), _recipe_flag("allow_pickle")]
FormatOption = Annotated[OutputFormat, typer.Option("--format", help="human tables, or JSON for scripts.")]
PickleOption = Annotated[bool, typer.Option(
    "--allow-pickle", help="Also read pickle .bin weights, which can run code when loaded (off: safetensors only).",
    metavar="", show_default=False)]
MergeStreaming = schema_choices(PruneStage, "streaming")  # auto, on, off: prune's vocabulary
MergeStreamingOption = Annotated[MergeStreaming, typer.Option(
    "--streaming", help="auto: from a local safetensors base with a spp.json, hold one tensor in RAM and resume a "
    "killed merge; on: insist (exit 2 when the base cannot); off: load the whole base (same output bytes).")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP, metavar="", show_default=False)]


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 140  # tables piped to a file or a log keep their full labels
    return Console(file=stream, highlight=False, soft_wrap=True, width=width)


def _verbose() -> bool:
    """`spp -v COMMAND`: let the libraries print their own warnings and progress bars."""
    context = get_current_context(silent=True)
    return bool(context is not None and (context.find_root().obj or {}).get("verbose"))


def _quiet_libraries() -> None:
    """spp prints its own progress lines; the libraries' bars (transformers' "Loading weights" and "Writing model
    shards", the Hub's downloads, datasets' "Generating train split" of an online --data/--calib source), advisory
    log lines and Python warnings (PEFT's FutureWarning for lora and ia3) would bury them. The warnings filter holds
    until run_cli returns (its catch_warnings); lm-eval is quieted in eval/quiet.py."""
    if _verbose():
        return
    import huggingface_hub
    import transformers

    warnings.simplefilter("ignore")  # spp's own warnings are "warning" events, never Python warnings
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:  # read when datasets is imported (importing it here would cost every command a second and a half)
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


_JSON_STREAM: list = []  # run_cli's real stdout while a `--format json` command runs with stdout sent to stderr


def _emit(result, output_format: OutputFormat, render) -> None:
    interrupts.outcome_decided()  # the result is published: a Ctrl-C from here on cannot make it "interrupted"
    if output_format == OutputFormat.json:
        (_JSON_STREAM[-1] if _JSON_STREAM else sys.stdout).write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        render(_console(), result)


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, metavar="")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Let the libraries (transformers, lm-eval) print their own warnings and progress bars.", metavar="")] = False,
) -> None:
    ctx.obj = {"verbose": verbose}
    if version:
        from spp_cli.environment import package_version

        typer.echo(f"spp {package_version('spp')}")
        raise typer.Exit()


@app.command(
    cls=SppCommand,
    epilog="Examples:\n\n"
    "    spp prune builtin:tiny-llama --method wanda --sparsity 0.5 --calib builtin:python-docs --out runs/w50\n\n"
    "    spp prune meta-llama/Llama-2-7b-hf --method sparsegpt --pattern 2:4 --seqlen 4096 --out llama2-7b-2of4\n\n"
    "    spp prune ./my-model --method magnitude --sparsity 0.7 --ignore 'down_proj' --out my-model-mag70",
)
@schema_command(
    PruneStage,
    leading=[
        parameter("model", str, typer.Argument(help="Hub id, local HF directory, or builtin:tiny-llama.")),
        parameter("out", Path, typer.Option("--out", help="Output directory (written atomically).")),
    ],
    trailing=[OVERWRITE, *LOADING, FORMAT],
)
def prune(options, *, model, out, overwrite, trust_remote_code, allow_pickle, output_format) -> None:
    """Prune a model one-shot (magnitude, Wanda, SparseGPT; unstructured or N:M) into an HF checkpoint + spp.json."""
    from spp_cli.render import render_prune
    from spp_cli.stages.prune import prune as run_prune

    _run_stage(PruneStage, run_prune, render_prune, model, out, options, output_format, overwrite=overwrite,
               trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)


@app.command(
    cls=SppCommand,
    epilog="Examples:\n\n"
    "    spp finetune runs/w50 --data builtin:python-docs --max-steps 100 --batch-size 16 --micro-batch-size 8 --seqlen 256 --out runs/w50-spp\n\n"
    "    spp finetune llama2-7b-2of4 --data alpaca-gpt4 --out llama2-7b-2of4-spp\n\n"
    "    accelerate launch --config_file recipes/launch/ddp.yaml -m spp_cli finetune llama2-7b-2of4 --data alpaca-gpt4 --out out/",
)
@schema_command(
    FinetuneStage,
    leading=[
        parameter("model_dir", str, typer.Argument(help="A pruned model directory (with spp.json).")),
        parameter("out", Path, typer.Option("--out", help="Output directory: merged model + adapter/ + spp.json.")),
    ],
    trailing=[OVERWRITE, *LOADING, FORMAT],
)
def finetune(options, *, model_dir, out, overwrite, trust_remote_code, allow_pickle, output_format) -> None:
    """Fine-tune a pruned model (SPP, or another recovery method) and merge; zero-keeping methods keep every zero."""
    from spp_cli.render import render_finetune
    from spp_cli.stages.finetune import finetune as run_finetune

    _run_stage(FinetuneStage, run_finetune, render_finetune, model_dir, out, options, output_format,
               overwrite=overwrite, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)


def _run_stage(stage, run, render, model: str, out: Path, options: dict, output_format: OutputFormat,
               **loading) -> None:
    """`spp prune` and `spp finetune`: the schema's options checked, the libraries quiet, the stage run with its
    events on stderr, its manifest shown (under torchrun/accelerate only rank 0 merges, saves and reports)."""
    from spp_cli.render import event_printer

    validate_options(stage, options, flags=True)
    _quiet_libraries()
    manifest = run(model, out, **loading, on_event=event_printer(_console(stderr=True)), **options)
    if "rank" not in manifest:
        _emit(manifest, output_format, lambda console, result: render(console, result, out))


@app.command(cls=SppCommand, epilog="Example:\n\n    spp finetune runs/w50 --data d.jsonl --no-merge --out runs/w50-spp && spp merge runs/w50-spp/adapter --out runs/w50-merged")
def merge(
    adapter_dir: Annotated[str, typer.Argument(help="An adapter directory written by finetune --no-merge (adapter_config.json).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for the merged model.")],
    overwrite: OverwriteOption = False,
    allow_pickle: PickleOption = False,
    streaming: MergeStreamingOption = MergeStreaming.auto,
    output_format: FormatOption = OutputFormat.human,
) -> None:
    """Merge a --no-merge adapter into its base model, with the same zero checks as finetune."""
    from spp_cli.render import event_printer, render_merge
    from spp_cli.stages.merge import merge_adapter

    _quiet_libraries()
    manifest = merge_adapter(adapter_dir, out, overwrite=overwrite, allow_pickle=allow_pickle,
                             streaming=streaming.value, on_event=event_printer(_console(stderr=True)))
    _emit(manifest, output_format, lambda console, result: render_merge(console, result, out))


@app.command(
    "eval",
    cls=SppCommand,
    epilog="Examples:\n\n"
    "    spp eval runs/w50 --tasks wikitext2,boolq --data-dir ../shared/data --limit 100 --out results.json\n\n"
    "    spp eval builtin:tiny-llama runs/w50 --tasks ppl:builtin:python-docs:test --seqlen 256 --out r.json\n\n"
    "    spp eval meta-llama/Llama-2-7b-hf --tasks wikitext2,boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa --seqlen 4096 --out r.json",
)
@schema_command(
    EvalStage,
    positional="models",
    leading=[parameter("out", Path, typer.Option("--out", help="results.json to write."))],
    trailing=[OVERWRITE, *LOADING, FORMAT],
)
def eval_command(options, *, out, overwrite, trust_remote_code, allow_pickle, output_format) -> None:
    """Evaluate models: the papers' token perplexity and lm-eval zero-shot tasks, online or from --data-dir."""
    from spp_cli.render import event_printer, render_eval
    from spp_cli.stages.evaluate import evaluate_models

    stage = validate_options(EvalStage, options, flags=True)
    _quiet_libraries()
    del options["models"], options["tasks"]
    results = evaluate_models(
        {name: name for name in stage.models}, stage.tasks, out, overwrite=overwrite,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        on_event=event_printer(_console(stderr=True)), verbose=_verbose(), **options,
    )
    if "rank" not in results:  # under torchrun/accelerate only rank 0 writes and reports
        _emit(results, output_format, render_eval)


@app.command(
    cls=SppCommand,
    epilog="Examples:\n\n"
    "    spp run recipes/quickstart.yaml\n\n"
    "    spp run recipes/paper/llama2-7b-50.yaml stages.prune.sparsity=0.6 output_dir=runs/w60\n\n"
    "    spp run recipes/quickstart.yaml --dry-run",
)
def run(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML file.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value or stages.NAME.KEY=value overrides.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Resolve and check only; load no model.", metavar="")] = False,
    output_format: FormatOption = OutputFormat.human,
) -> None:
    """Run a recipe's stages in order; a finished stage with the same options is skipped, a broken one resumed,
    a changed one (and every stage after it) rerun into the same folder."""
    from spp_cli.pipeline import run_recipe
    from spp_cli.render import event_printer, render_run

    _quiet_libraries()
    summary = run_recipe(recipe, overrides or [], dry_run=dry_run, on_event=event_printer(_console(stderr=True)))
    _emit(summary, output_format, render_run)
    if not (summary.get("expectations") or {"ok": True})["ok"]:
        raise typer.Exit(1)  # a pinned result missed its tolerance: a check failed


@app.command(cls=SppCommand, epilog="Examples:\n\n    spp verify runs/quickstart/finetune --against runs/quickstart/prune\n\n    spp verify runs/w50")
def verify(
    directory: Annotated[Path, typer.Argument(help="A model directory with spp.json.")],
    against: Annotated[Path | None, typer.Option("--against", help="Parent directory whose zeros must all survive.")] = None,
    output_format: FormatOption = OutputFormat.human,
) -> None:
    """Check the declared pattern and that no zero was lost (exit 1 lists the layers; extra zeros are counted)."""
    from spp_cli.render import render_verify
    from spp_cli.stages.verify import verify_checkpoint

    report = verify_checkpoint(directory, against)
    _emit(report, output_format, render_verify)
    if not report["ok"]:
        raise typer.Exit(1)


@app.command(cls=SppCommand, epilog="Example:\n\n    spp report runs/quickstart")
def report(
    run_dir: Annotated[Path, typer.Argument(help="A `spp run` output directory.")],
    output_format: FormatOption = OutputFormat.human,
) -> None:
    """Write report.md and PNG plots (metrics per stage, per-layer sparsity, fine-tune loss) for a run."""
    from spp_cli.report import write_report

    result = write_report(run_dir)
    _emit(result, output_format, lambda console, r: console.print(f"report written: {r['report']}"))


@app.command(cls=SppCommand, epilog="Example:\n\n    spp env --format json")
def env(output_format: FormatOption = OutputFormat.human) -> None:
    """Versions, devices and cache locations."""
    from spp_cli.environment import environment_report
    from spp_cli.render import render_env

    _emit(environment_report(), output_format, render_env)


@app.command(
    cls=SppCommand,
    epilog="Examples:\n\n"
    "    spp bench --shape llama-7b --nsamples 128 --seqlen 2048\n\n"
    "    spp bench --shape llama-70b --blocks 1 --sections prune,recovery --format json > bench-70b.json\n\n"
    "    spp bench builtin:tiny-llama --nsamples 8 --seqlen 64 --steps 1",
)
def bench(
    model: Annotated[str | None, typer.Argument(help="Hub id, local HF directory or builtin:tiny-llama (or use --shape).")] = None,
    shape: Annotated[str | None, typer.Option("--shape", help="A real model's shape with random weights: tiny, llama-7b, llama-13b, llama-70b, llama3-8b, llama3-70b.")] = None,
    blocks: Annotated[int, typer.Option("--blocks", help="Decoder blocks built (a MODEL keeps its first N); results are extrapolated to the real depth.")] = 2,
    nsamples: Annotated[int, typer.Option("--nsamples", help="Calibration windows of the prune cases.")] = 128,
    seqlen: Annotated[int | None, typer.Option("--seqlen", help="Calibration, training and eval sequence length [default: min(2048, model's max positions)].", show_default=False)] = None,
    batch: Annotated[int, typer.Option("--batch", help="Sequences per recovery step and per eval forward.")] = 1,
    steps: Annotated[int, typer.Option("--steps", help="Timed repeats of each step and forward (the median is reported).")] = 3,
    sparsity: Annotated[float, typer.Option("--sparsity", help="Sparsity of the unstructured prune cases.")] = 0.5,
    methods: Annotated[str | None, typer.Option("--methods", help="Comma-separated recovery methods [default: every one]; lora (PEFT, r 8) always runs as the baseline.", show_default=False)] = None,
    sections: Annotated[str, typer.Option("--sections", help="Comma-separated: prune, recovery (with merge), eval, semi-structured.")] = "prune,recovery,eval,semi-structured",
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:i].")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (bfloat16 on a GPU that has it, else float16; float32 on a CPU), float32, bfloat16 or float16.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Random weights (--shape) and token ids.")] = 0,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repo's own Python code.", metavar="", show_default=False)] = False,
    allow_pickle: PickleOption = False,
    output_format: FormatOption = OutputFormat.human,
) -> None:
    """Measure on this device what pruning and recovery will cost: prune, recovery step (every method against PEFT
    LoRA r=8), merge, eval and 2:4 kernel speed, per block and extrapolated to the whole model."""
    from spp_cli.bench import BenchOptions, run_bench
    from spp_cli.render import event_printer
    from spp_cli.render_bench import render_bench

    def listed(text: str | None) -> list[str]:
        return [item.strip() for item in (text or "").split(",") if item.strip()]

    _quiet_libraries()
    result = run_bench(BenchOptions(
        model=model, shape=shape, blocks=blocks, nsamples=nsamples, seqlen=seqlen, batch=batch, steps=steps,
        sparsity=sparsity, methods=listed(methods), sections=listed(sections), device=device, dtype=dtype, seed=seed,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
    ), on_event=event_printer(_console(stderr=True)))
    _emit(result, output_format, render_bench)


def run_cli(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; a failure becomes one line on stderr and its exit code (DESIGN.md),
    with `--format json` also a JSON object on stdout (spp_cli/error_output.py)."""
    command = typer.main.get_command(app)
    debug = os.environ.get("SPP_DEBUG") == "1"
    wants_json = error_output.wants_json(argv if argv is not None else sys.argv[1:])
    if wants_json:  # libraries that print to stdout (deepspeed's import-time logger) would break the JSON
        _JSON_STREAM.append(sys.stdout)
    try:
        with warnings.catch_warnings(), (
                contextlib.redirect_stdout(sys.stderr) if wants_json else contextlib.nullcontext()):
            code = command.main(args=argv, prog_name="spp", standalone_mode=False)
    except typer.Exit as exit_:
        code = exit_.exit_code
    except (KeyboardInterrupt, Exception) as error:  # usage errors, Ctrl-C, SppError and the rest
        interrupts.outcome_decided()  # a second Ctrl-C while spp exits changes nothing (and prints no traceback)
        if debug and error_output.shows_traceback(error):
            raise
        return error_output.failure(error, wants_json)
    finally:
        if wants_json:
            _JSON_STREAM.pop()
    interrupts.outcome_decided()
    code = code if isinstance(code, int) else 0
    if code == 130:  # Typer turns Ctrl-C inside a command into exit code 130
        return error_output.interrupted(wants_json)
    return code


def main() -> None:
    """The console script: run_cli in a process whose exit a late Ctrl-C cannot disturb (spp_cli/interrupts.py)."""
    with interrupts.console_process():
        code = run_cli(sys.argv[1:])
    sys.exit(code)

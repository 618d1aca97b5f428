"""One definition per option: every command's options equal its stage's schema keys (name, type, default,
choices), the recipe and the command agree on defaults, and every layer offers the vocabulary's names."""

import typing

import pytest
import typer

from spp_cli.cli import app
from spp_cli.cli_options import command_default, command_fields
from spp_cli.recipe.resolve import parse_recipe, validate_options
from spp_cli.recipe.schema import EvalStage, FinetuneStage, PruneStage, schema_fields
from spp_cli.vocabulary import DTYPES, FINETUNE_METHODS, PRUNE_METHODS, SPP_FORWARDS

# a command's own options: where to write, how to print, how to load (top-level recipe keys)
COMMAND_ONLY = {"out", "output_format", "overwrite", "trust_remote_code", "allow_pickle", "help"}
COMMANDS = {"prune": (PruneStage, None), "finetune": (FinetuneStage, None), "eval": (EvalStage, "models")}
PYTHON_TYPES = {"int": int, "float": float, "bool": bool}


def click_command(name: str):
    return typer.main.get_command(app).commands[name]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_a_schema_key_with_its_type_default_and_choices(name):
    stage_class, positional = COMMANDS[name]
    options = {p.name: p for p in click_command(name).params if p.param_type_name == "option"}
    options = {key: p for key, p in options.items() if key not in COMMAND_ONLY}
    fields = {f.name: f for f in command_fields(stage_class, positional)}
    assert sorted(options) == sorted(fields)  # and vice versa
    for key, param in options.items():
        option = fields[key].metadata["spp"]
        assert param.opts == ["--" + key.replace("_", "-")], key
        default = command_default(fields[key])
        assert (param.default.value if hasattr(param.default, "value") else param.default) == default, key
        assert param.required == option.required, key
        annotation = param.type_descriptor.annotation
        annotation = next(a for a in typing.get_args(annotation) or [annotation] if a is not type(None))
        if option.choices:
            assert tuple(choice.value for choice in annotation) == option.choices, key
        else:
            assert annotation is PYTHON_TYPES.get(option.kind, str), key
        assert param.help and param.help == option.help, key


def test_every_schema_key_has_help_text():
    for stage_class in (PruneStage, FinetuneStage, EvalStage):
        for field in command_fields(stage_class):
            assert field.metadata["spp"].help, (stage_class.TYPE, field.name)


def test_vocabulary_is_what_the_engines_offer():
    from pruners import PRUNERS
    from spp_cli.adapters.spp import FORWARD_VARIANTS

    assert tuple(PRUNERS) == PRUNE_METHODS
    assert FORWARD_VARIANTS == SPP_FORWARDS
    assert PruneStage.__dataclass_fields__["method"].metadata["spp"].choices == PRUNE_METHODS
    assert FinetuneStage.__dataclass_fields__["method"].metadata["spp"].choices == FINETUNE_METHODS
    assert {f.metadata["spp"].choices for f in schema_fields(PruneStage) if f.name == "dtype"} == {DTYPES}


def recipe(**prune):
    return parse_recipe({"model": "builtin:tiny-llama", "stages": [
        {"type": "prune", "method": "wanda", **prune},
        {"type": "finetune", "data": "builtin:python-docs", "forward": "recompute"},
    ]})


def test_recipe_and_command_agree_on_defaults():
    """Bugs that were: `forward: recompute` (the faithful default) was refused by recipes; unstructured
    pruning without a sparsity was refused by recipes but meant 0.5 to the CLI."""
    from_recipe = recipe().stages[0]
    from_command = validate_options(PruneStage, {"method": "wanda"})
    assert from_recipe.sparsity == from_command.sparsity == 0.5
    assert from_recipe.seed == from_command.seed == 0
    assert from_recipe.command_options() == from_command.command_options()
    assert recipe().stages[1].forward == "recompute"


@pytest.mark.parametrize("values, message", [
    ({"method": "wanda", "device": "mps"}, "--device: 'mps' is not auto, cpu, cuda or cuda:N"),
    ({"method": "wanda", "sparsity": 1.5}, "--sparsity: 1.5 is out of range; use a number in (0, 1)"),
    ({"method": "magnitude", "use_variant": True}, "--use-variant: is a Wanda option"),
    ({"method": "wanda", "sparsty": 0.5}, "unknown prune option '--sparsty'; did you mean '--sparsity'?"),
])
def test_command_options_get_the_recipe_checks(values, message):
    from spp_cli.errors import BadInput

    with pytest.raises(BadInput) as error:
        validate_options(PruneStage, values, flags=True)
    assert str(error.value).startswith(message)


def test_forward_grouped_is_refused_where_it_used_to_pass():
    from spp_cli.errors import BadInput

    with pytest.raises(BadInput, match="'grouped' is not one of auto, naive, recompute, fused"):
        validate_options(FinetuneStage, {"data": "x.jsonl", "forward": "grouped"})

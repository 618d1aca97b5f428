"""Help that is right: every option has text and shows its true default, flags show no `<bool>`, every example
names files that exist, and `spp` alone is a usage error."""

import re
import shlex

import pytest
import typer
from conftest import REPO, run_spp

from spp_cli.cli import app

COMMANDS = typer.main.get_command(app).commands


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_text_and_its_true_default(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option, so defaults can be read back
    code, out, _ = run_spp([name, "--help"], capsys)
    assert code == 0
    assert "<bool>" not in out
    for param in COMMANDS[name].params:
        if param.param_type_name != "option":
            continue
        assert param.help, f"{name} {param.opts[0]} has no help text"
        line = option_help(out, param.opts[0])
        default = param.default.value if hasattr(param.default, "value") else param.default
        if param.is_flag:
            assert default is False and "[default" not in line, line
        elif default is not None and not param.required:
            assert f"[default: {default}]" in line, line


def option_help(help_text: str, flag: str) -> str:
    """The rows rich prints for one option: its own line and the wrapped lines under it."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"│\s+(\*\s+)?{re.escape(flag)}\b", line))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"│\s+(\*\s+)?-", lines[i])), len(lines))
    return " ".join(" ".join(line.strip("│ ").split()) for line in lines[start:end])


def example_commands(name: str) -> list[list[str]]:
    epilog = COMMANDS[name].epilog or ""
    return [shlex.split(line.strip()) for line in epilog.splitlines() if line.strip().startswith(("spp ", "accel"))]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_example_names_files_that_exist(name):
    examples = example_commands(name)
    assert examples, f"spp {name} --help has no example"
    for words in examples:
        for word in words:
            if word.startswith("recipes/") or word.endswith((".yaml", ".yml")):
                assert (REPO / word).exists(), f"spp {name} --help names {word}, which is not in the repo"


def test_spp_alone_shows_help_and_is_a_usage_error(capsys):
    code, out, _ = run_spp([], capsys)
    assert code == 2 and "Commands" in out


def test_env_prints_a_table_for_people_and_json_for_scripts(capsys):
    code, out, _ = run_spp(["env"], capsys)
    assert code == 0 and "transformers" in out and not out.lstrip().startswith("{")
    code, out, _ = run_spp(["env", "--format", "json"], capsys)
    assert code == 0 and out.lstrip().startswith("{")

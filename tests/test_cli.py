"""The CLI as a table of contents: every command has an example in its --help and every option says
what it is; --help answers before any heavy library is imported; aliases keep old habits working."""

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from appliance.cli import main
from conftest import REPO


def commands(group=main, path=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = list(commands())


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_has_an_example_and_every_option_a_help(path, command):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and f"appliance {' '.join(path)}" in result.output
    undocumented = [p.name for p in command.params if isinstance(p, click.Option) and not p.help]
    assert not undocumented, undocumented


def test_help_does_not_import_torch():
    code = "import sys; from appliance.cli import main; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_the_replace_flag_has_one_meaning_under_three_names():
    for path in (("train",), ("merge",), ("models", "import"), ("models", "rm"), ("adapters", "rm"), ("service", "install")):
        output = CliRunner().invoke(main, [*path, "--help"]).output
        assert all(alias in output for alias in ("--overwrite", "--force", "--yes")), path


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "argv",
    [
        ["merge", "nosuch"],
        ["eval", "nosuch"],
        ["bench", "merge", "nosuch"],
        ["serve", "nosuch"],
        ["export", "nosuch"],
        ["train", "--model", "nosuch", "--data", "appliance/demo/facts.jsonl"],
        ["plan", "--model", "nosuch", "--gpu", "RTX 3060"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_a_mistyped_name_fails_before_torch_is_imported(argv):
    """A typo costs a message, not seconds of imports: the exit code is 2 and torch was never loaded."""
    code = (
        "import sys; from appliance.cli import main\n"
        "try:\n    main(sys.argv[1:], standalone_mode=True)\n"
        "except SystemExit as e:\n    print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(e.code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("NO-TORCH"), proc.stdout + proc.stderr

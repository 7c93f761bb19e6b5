"""Shell completion: `appliance completion install` in a fresh HOME, then the real shell completes.

Each shell is started as a user's would be (interactive, reading its start-up files from HOME)
and asked for completions of commands, option choices and run names from the store. A shell
that is not installed on this machine is skipped with its name.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import main

BIN = str(Path(sys.executable).parent)  # where the `appliance` command the scripts call lives


@pytest.fixture
def user(tmp_path, appliance_home):
    """A fresh HOME, PATH with `appliance` on it, and a store with one run named `facts`."""
    home = tmp_path / "user"
    home.mkdir()
    (appliance_home / "runs" / "facts").mkdir(parents=True)
    (appliance_home / "runs" / "facts" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "BASH_COMPLETION", "ZDOTDIR"))}
    env.update(HOME=str(home), PATH=f"{BIN}:{os.environ['PATH']}", APPLIANCE_HOME=str(appliance_home))
    return home, env


def shell(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed on this machine (apt-get install {name})")
    return path


def install(env, *args) -> subprocess.CompletedProcess:
    result = subprocess.run([f"{BIN}/appliance", "completion", "install", *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def interactive(shell_path: str, script: str, env) -> str:
    result = subprocess.run([shell_path, "-i", "-c", script], env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_show_prints_each_shells_script():
    for name, marker in (("bash", "complete -o nosort -F _appliance_completion appliance"), ("zsh", "#compdef appliance"),
                         ("fish", "complete --no-files --command appliance")):
        result = CliRunner().invoke(main, ["completion", "show", name])
        assert result.exit_code == 0 and marker in result.output and "_APPLIANCE_COMPLETE" in result.output, name


def test_bash_install_completes_commands_choices_and_run_names(user):
    bash = shell("bash")
    home, env = user
    (home / ".bashrc").write_text("export KEPT=1\n")
    install(env, "--shell", "bash")
    install(env, "--shell", "bash")  # a second install changes nothing
    bashrc = (home / ".bashrc").read_text()
    assert bashrc.startswith("export KEPT=1\n") and bashrc.count("appliance completion install") == 1
    assert (home / ".local/share/bash-completion/completions/appliance").is_file()

    def complete(*words: str) -> list[str]:
        script = f'COMP_WORDS=({" ".join(words)} ""); COMP_CWORD={len(words)}; _appliance_completion appliance; printf "%s\\n" "${{COMPREPLY[@]}}"'
        return interactive(bash, script, env).split()

    assert "runs" in complete("appliance") and "completion" in complete("appliance")
    assert complete("appliance", "train", "--report-to") == ["tensorboard", "mlflow", "wandb"]
    assert complete("appliance", "runs", "show") == ["facts"]


def test_zsh_install_registers_the_completion_and_it_answers(user):
    zsh = shell("zsh")
    home, env = user
    install(env, "--shell", "zsh")
    assert "appliance completion install" in (home / ".zshrc").read_text()
    # Started as a user's shell: .zshrc loads the script, which registers itself with compsys.
    out = interactive(zsh, "print -r -- ${_comps[appliance]}; whence -w _appliance_completion", env)
    assert out.split() == ["_appliance_completion", "_appliance_completion:", "function"]
    # What that function asks `appliance` for, and gets (zsh's completion protocol in Click).
    asked = subprocess.run(
        [f"{BIN}/appliance"], env={**env, "_APPLIANCE_COMPLETE": "zsh_complete", "COMP_WORDS": "appliance runs show ", "COMP_CWORD": "3"},
        capture_output=True, text=True, timeout=120,
    )
    assert asked.stdout.split("\n")[:2] == ["plain", "facts"], asked.stdout


def test_fish_install_completes_commands_choices_and_run_names(user):
    fish = shell("fish")
    home, env = user
    install(env, "--shell", "fish")
    assert (home / ".config/fish/completions/appliance.fish").is_file()

    def complete(line: str) -> list[str]:
        out = subprocess.run([fish, "-c", f"complete -C {line!r}"], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return [row.split("\t")[0] for row in out.stdout.splitlines()]

    assert "runs" in complete("appliance ") and "train" in complete("appliance tr")
    assert complete("appliance train --report-to ") == ["mlflow", "tensorboard", "wandb"]  # fish sorts them
    assert complete("appliance runs show ") == ["facts"]


def test_install_picks_the_shell_from_SHELL(user):
    home, env = user
    result = install({**env, "SHELL": "/usr/bin/fish"})
    assert "fish completion installed" in result.stdout
    assert (home / ".config/fish/completions/appliance.fish").is_file()
    assert not (home / ".bashrc").exists() and not (home / ".zshrc").exists()


def _panel(result) -> str:
    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())


@pytest.mark.bad_input
def test_install_for_an_unknown_shell_says_how_to_name_one(user, monkeypatch):
    home, env = user
    monkeypatch.setenv("SHELL", "/bin/tcsh")
    monkeypatch.setenv("HOME", str(home))
    result = CliRunner().invoke(main, ["completion", "install"], catch_exceptions=False)
    text = _panel(result)
    assert result.exit_code == 2, text
    assert "$SHELL is '/bin/tcsh'" in text and "appliance completion install --shell bash" in text
    assert not any(home.iterdir()), "nothing written"


@pytest.mark.bad_input
def test_show_for_an_unknown_shell_lists_the_known_ones():
    result = CliRunner().invoke(main, ["completion", "show", "powershell"], catch_exceptions=False)
    text = _panel(result)
    assert result.exit_code == 2, text
    assert "'powershell' is not one of 'bash', 'zsh', 'fish'" in text

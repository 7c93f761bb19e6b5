"""`appliance completion ...`: shell completion for bash, zsh and fish, from Click's own scripts.

The script each shell gets is Click's (click.shell_completion): it asks `appliance` itself what
to complete, through the _APPLIANCE_COMPLETE variable, so completions follow the commands, their
options and choices (and run names) as they are. `install` writes it where each shell looks:

    bash  $XDG_DATA_HOME/bash-completion/completions/appliance  (bash-completion loads it on demand)
    zsh   ${ZDOTDIR:-~}/.zfunc/_appliance
    fish  $XDG_CONFIG_HOME/fish/completions/appliance.fish     (fish loads it on demand)

and, for bash and zsh, adds one guarded line to ~/.bashrc or ~/.zshrc that loads it (bash
without the bash-completion package, and zsh, would not look there by themselves).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

SHELLS = ("bash", "zsh", "fish")
PROG = "appliance"
MARK = "# appliance shell completion (appliance completion install)"


def completion_script(shell: str) -> str:
    from click.shell_completion import get_completion_class

    from appliance.cli import main

    return get_completion_class(shell)(main, {}, PROG, f"_{PROG.upper()}_COMPLETE").source()


def _home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def _xdg(var: str, default: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else _home() / default


def script_path(shell: str) -> Path:
    if shell == "bash":
        user_dir = os.environ.get("BASH_COMPLETION_USER_DIR")
        base = Path(user_dir.split(":")[0]) if user_dir else _xdg("XDG_DATA_HOME", ".local/share") / "bash-completion"
        return base / "completions" / PROG
    if shell == "zsh":
        return Path(os.environ.get("ZDOTDIR") or _home()) / ".zfunc" / f"_{PROG}"
    return _xdg("XDG_CONFIG_HOME", ".config") / "fish" / "completions" / f"{PROG}.fish"


def rc_file(shell: str) -> Path | None:
    """The start-up file that loads the script, for the shells that need one."""
    if shell == "bash":
        return _home() / ".bashrc"
    if shell == "zsh":
        return Path(os.environ.get("ZDOTDIR") or _home()) / ".zshrc"
    return None


def rc_line(shell: str, script: Path) -> str:
    quoted = f'"{script}"'
    if shell == "zsh":  # Click's zsh script registers itself with compdef, which compinit defines
        return f"[ -r {quoted} ] && {{ (( $+functions[compdef] )) || {{ autoload -Uz compinit && compinit; }}; . {quoted}; }}  {MARK}"
    return f"[ -r {quoted} ] && . {quoted}  {MARK}"


def detect_shell() -> str:
    from appliance.errors import ApplianceError

    name = Path(os.environ.get("SHELL", "")).name
    if name not in SHELLS:
        raise ApplianceError(
            f"Cannot tell which shell to install completion for ($SHELL is {os.environ.get('SHELL') or 'not set'!r}).",
            "name it: appliance completion install --shell bash (or zsh, fish)",
        )
    return name


def add_rc_line(rc: Path, line: str) -> bool:
    """Add the loading line once (replacing an older one of ours); True when the file changed.
    Written in place, not renamed over, so a start-up file that is a link to dotfiles stays one."""
    text = rc.read_text(encoding="utf-8") if rc.is_file() else ""
    lines = text.splitlines()
    if line in lines:
        return False
    kept = [existing for existing in lines if not existing.endswith(MARK)]
    rc.parent.mkdir(parents=True, exist_ok=True)
    rc.write_text("\n".join([*kept, line]) + "\n", encoding="utf-8")
    return True


@click.group()
def completion() -> None:
    """Shell completion for bash, zsh and fish (commands, options, choices, run names)."""


@completion.command()
@click.argument("shell", type=click.Choice(SHELLS))
def show(shell) -> None:
    """Print the completion script for SHELL (to load it yourself, e.g. from your shell's start-up file).

    \b
    Examples:
      appliance completion show bash > ~/.appliance-complete.bash
      eval "$(appliance completion show zsh)"
    """
    click.echo(completion_script(shell), nl=False)


@completion.command()
@click.option("--shell", type=click.Choice(SHELLS), help="the shell to complete in (default: the one $SHELL names)")
@click.option("--no-rc", is_flag=True, help="do not add the line that loads the script to ~/.bashrc or ~/.zshrc")
def install(shell, no_rc) -> None:
    """Install completion for your shell where it looks for it; takes effect in a new shell.

    \b
    Examples:
      appliance completion install
      appliance completion install --shell fish
    """
    from appliance import ui
    from appliance.errors import ApplianceError
    from appliance.store import atomic_write

    shell = shell or detect_shell()
    path = script_path(shell)
    rc = None if no_rc else rc_file(shell)
    try:
        atomic_write(path, completion_script(shell))
        changed = rc is not None and add_rc_line(rc, rc_line(shell, path))
    except OSError as err:
        raise ApplianceError(f"Cannot write the completion script: {err}.", "check the folder's permissions, or use `appliance completion show`") from None
    ui.console.print(f"[green]{shell} completion installed[/] {path}")
    if rc is not None:
        ui.console.print(f"  loaded from {rc}" + ("" if changed else " (already)"))
    ui.console.print("  open a new shell (or `exec $SHELL`), then try: appliance tr<TAB>")


commands = [completion]

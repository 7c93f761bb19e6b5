"""The `appliance` command. Commands parse options, call one step, render the result.

User mistakes arrive as ApplianceError and leave as one panel and a non-zero
exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

import click

from appliance import __version__
from appliance.errors import ApplianceError, TrainingInterrupted

# Library progress bars would interleave with our own spinners and dashboard.
os.environ.setdefault("TQDM_DISABLE", "1")


class ApplianceGroup(click.Group):
    def invoke(self, ctx: click.Context):
        from appliance import ui

        try:
            return super().invoke(ctx)
        except ApplianceError as err:
            ui.fail(err.message, err.fix, err.details)
            sys.exit(err.exit_code)
        except click.UsageError as err:  # an option's value or a missing argument: the same panel, exit 2
            where = err.ctx.command_path.replace(err.ctx.find_root().info_name or "", "appliance", 1) if err.ctx else "appliance"
            ui.fail(err.format_message(), f"see `{where} --help`")
            sys.exit(2)
        except TrainingInterrupted as stop:
            ui.warn(f"stopped; checkpoint saved at {stop.checkpoint}. Continue with the same command and --resume.")
            sys.exit(stop.exit_code)
        except KeyboardInterrupt:
            ui.warn("interrupted")
            sys.exit(130)


@click.group(cls=ApplianceGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="appliance")
def main() -> None:
    """Fine-tune a LLaMA-family model in 4-bit on one GPU (or CPU), then serve it with vLLM.

    \b
    Quick start:
      appliance quickstart                       # the whole path on SmolLM2
      appliance models import smollm2
      appliance data check my.jsonl --model smollm2
      appliance train --model smollm2 --data my.jsonl --name my-adapter
    """


def _register() -> None:
    from appliance.cli import adapters, bench, client, completion, data, doctor, evaluate, export, merge, models, plan, quickstart, runs, serve, service, train

    for group in (models.models, data.data, runs.runs, completion.completion):
        main.add_command(group)
    for module in (quickstart, plan, train, evaluate, merge, export, serve, service, adapters, client, bench, doctor):
        for command in module.commands:
            main.add_command(command)


_register()

"""`appliance ask` and `appliance chat`: the endpoint through the official openai SDK."""

from __future__ import annotations

import click

from appliance.cli.common import json_option, print_json


def endpoint_options(fn):
    fn = click.option("--api-key", default=None, help="API key (default: $APPLIANCE_API_KEY, the running server's, or the service's)")(fn)
    fn = click.option("--url", default=None, help="server URL (default: $APPLIANCE_URL, the service's, a running `appliance serve`, or http://127.0.0.1:8000)")(fn)
    fn = click.option("--adapter", default=None, help="talk to this adapter (a domain) instead of the base")(fn)
    fn = click.option("--model", default=None, help="served model name (default: the served base or merged model)")(fn)
    return fn


@click.command()
@click.argument("question")
@endpoint_options
@click.option("--system", default=None, help="system prompt")
@click.option("--max-tokens", default=256, show_default=True, help="longest answer, in tokens")
@click.option("--temperature", default=0.0, show_default=True, help="0: the most likely answer, the same every time")
@json_option
def ask(question, model, adapter, url, api_key, system, max_tokens, temperature, as_json) -> None:
    """Print one answer to QUESTION (for scripts: the answer only, on stdout); `-` reads it from stdin.

    \b
    Examples:
      appliance ask "What is the capital of Zorvania?" --adapter facts
      echo "Summarise this: ..." | appliance ask - --json
    """
    import sys

    from appliance.client import ask as ask_endpoint
    from appliance.errors import ApplianceError
    from appliance.serve import find_endpoint

    if question == "-":
        question = sys.stdin.read().strip()
        if not question:
            raise ApplianceError("`appliance ask -` read an empty question from stdin.", "pipe the question in: echo \"...\" | appliance ask -")
    answer = ask_endpoint(
        find_endpoint(url, api_key), question, model=adapter or model, system=system, temperature=temperature, max_tokens=max_tokens
    )
    if as_json:
        print_json(answer.__dict__)
        return
    click.echo(answer.text)


@click.command()
@endpoint_options
@click.option("--system", default=None, help="system prompt")
@click.option("--temperature", default=0.7, show_default=True, help="higher: more varied answers")
@click.option("--max-tokens", default=512, show_default=True, help="longest answer, in tokens")
def chat(model, adapter, url, api_key, system, temperature, max_tokens) -> None:
    """Chat with the served model, streaming. Commands: /exit, /reset, /system TEXT.

    \b
    Examples:
      appliance chat
      appliance chat --adapter recipes --system "You are a careful cook."
    """
    from appliance import ui
    from appliance.client import Conversation, default_model, stream_chat
    from appliance.serve import find_endpoint

    endpoint = find_endpoint(url, api_key)
    name = adapter or model or default_model(endpoint)
    ui.console.print(f"[dim]chatting with {name} at {endpoint.url} — /exit to leave, /reset to start over[/]")
    conversation = Conversation(system)
    while (text := ui.prompt("[bold cyan]you[/]")) is not None:
        action = conversation.take(text)
        if action == "exit":
            return
        if action == "reset":
            ui.console.print("[dim]conversation cleared[/]")
        if action == "send":
            deltas = stream_chat(endpoint, conversation.messages, model=name, temperature=temperature, max_tokens=max_tokens)
            conversation.answered(ui.stream_markdown(deltas))


commands = [ask, chat]

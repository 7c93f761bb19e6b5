"""`appliance ask` and `appliance chat`: the endpoint through the official openai SDK."""

from __future__ import annotations

import click


def endpoint_options(fn):
    fn = click.option("--api-key", default=None, help="API key (default: $APPLIANCE_API_KEY or the service's)")(fn)
    fn = click.option("--url", default=None, help="server URL (default: $APPLIANCE_URL, the service's, or http://127.0.0.1:8000)")(fn)
    fn = click.option("--adapter", default=None, help="talk to this adapter (a domain) instead of the base")(fn)
    fn = click.option("--model", default=None, help="served model name (default: the served base or merged model)")(fn)
    return fn


@click.command()
@click.argument("question")
@endpoint_options
@click.option("--system", default=None, help="system prompt")
@click.option("--max-tokens", default=256, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
def ask(question, model, adapter, url, api_key, system, max_tokens, temperature) -> None:
    """Print one answer to QUESTION (for scripts: the answer only, on stdout).

    \b
    Example:
      appliance ask "What is the capital of Zorvania?" --adapter facts
    """
    from appliance.client import ask as ask_endpoint
    from appliance.serve.endpoint import find_endpoint

    answer = ask_endpoint(
        find_endpoint(url, api_key), question, model=adapter or model, system=system, temperature=temperature, max_tokens=max_tokens
    )
    click.echo(answer.text)


@click.command()
@endpoint_options
@click.option("--system", default=None, help="system prompt")
@click.option("--temperature", default=0.7, show_default=True)
@click.option("--max-tokens", default=512, show_default=True)
def chat(model, adapter, url, api_key, system, temperature, max_tokens) -> None:
    """Chat with the served model, streaming. Commands: /exit, /reset, /system TEXT."""
    from rich.live import Live
    from rich.markdown import Markdown
    from rich.prompt import Prompt

    from appliance import ui
    from appliance.client import default_model, stream_chat
    from appliance.serve.endpoint import find_endpoint

    endpoint = find_endpoint(url, api_key)
    name = adapter or model or default_model(endpoint)
    ui.console.print(f"[dim]chatting with {name} at {endpoint.url} — /exit to leave, /reset to start over[/]")
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            text = Prompt.ask("[bold cyan]you[/]")
        except (EOFError, KeyboardInterrupt):
            ui.console.print()
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/reset":
            history = [m for m in history if m["role"] == "system"]
            ui.console.print("[dim]conversation cleared[/]")
            continue
        if text.startswith("/system "):
            history = [{"role": "system", "content": text[8:]}] + [m for m in history if m["role"] != "system"]
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        reply = ""
        with Live(Markdown(""), console=ui.console, refresh_per_second=12) as live:
            for delta in stream_chat(endpoint, history, model=name, temperature=temperature, max_tokens=max_tokens):
                reply += delta
                live.update(Markdown(reply))
        history.append({"role": "assistant", "content": reply})


commands = [ask, chat]

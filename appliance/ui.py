"""rich rendering shared by commands: the live training dashboard, tables, the error panel.

When stdout is not a terminal, the dashboard prints one plain line per step
instead, so logs and CI output stay readable.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterable

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def json_output():
    """For `--json`: everything a command would show goes to stderr, so stdout holds the JSON alone."""
    global console
    kept, console = console, err_console
    try:
        yield
    finally:
        console = kept


def fail(message: str, fix: str | None = None, details: Iterable[str] = ()) -> None:
    body = Text(message, style="bold")
    for line in details:
        body.append("\n" + line)
    if fix:
        body.append("\nFix: ", style="bold green")
        body.append(fix)
    err_console.print(Panel(body, title="error", title_align="left", border_style="red", expand=False))


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}")


def info(message: str) -> None:
    console.print(message)


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def human_count(n: int | float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def key_value_table(rows: dict[str, Any], title: str | None = None) -> Table:
    table = Table(show_header=False, title=title, title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, str(value))
    return table


def sparkline(values: list[float], width: int = 40) -> str:
    bars = "▁▂▃▄▅▆▇█"
    values = values[-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(bars[min(len(bars) - 1, int((v - lo) / span * (len(bars) - 1)))] for v in values)


def agreement_line(a, min_top1: float, max_mean_kl: float) -> str:
    """A parity check's figures against its gates: the merge's and the export's read the same."""
    return (f"top-1 agreement {a.top1_agreement:.2%} at {a.clear_positions} clear positions (gate {min_top1:.0%}), "
            f"{a.top1_agreement_all:.2%} at all; mean KL {a.mean_kl:.2e} (gate {max_mean_kl:g})")


# The colors curves take in turn (plotext's palette codes), so a run keeps its color in every chart.
CURVE_COLORS = (12, 9, 10, 13, 14, 11)


def curve_chart(
    title: str, series: dict[str, tuple[list, list]], width: int = 60, height: int = 12, color: bool = True, order: list[str] | None = None
) -> str:
    """Line charts as terminal text (plotext): one curve per series, a legend when there are several.

    `order` fixes each label's color (its place in it), so a run keeps its color across charts."""
    import plotext as plt

    fig = plt.figure  # plotext draws on one module-level figure: cleared each time
    fig.clear()
    fig.plot_size(width, height)
    fig.theme("simple")
    order = order or list(series)
    drawn = {k: v for k, v in series.items() if v[0]}
    for label, (xs, ys) in drawn.items():
        pixel = CURVE_COLORS[order.index(label) % len(CURVE_COLORS)] if label in order else CURVE_COLORS[0]
        signal = fig.signal(list(xs), list(ys), marker=plt.marker("braille", pixel=pixel)).lines()
        fig.draw(signal.label(label) if len(drawn) > 1 else signal)
    if len(drawn) > 1:  # top right: where falling curves leave room
        fig.legend(x=max(max(xs) for xs, _ in drawn.values()), y=max(max(ys) for _, ys in drawn.values()), relative=True, ha="right", va="top")
    fig.title(title)
    return fig.build().string(colorless=not color)


class Dashboard:
    """Consumes training events (appliance.train.events) and shows them.

    On a terminal the live panel draws the loss curve (train, and validation once there is one)
    with plotext under the figures; rich's Live redraws it on each step. Where the terminal is
    too narrow for a chart (or plotext is not installed), the train loss keeps its sparkline.
    """

    def __init__(self, out: Console | None = None, live: bool | None = None):
        self.console = out or console
        self.live_mode = self.console.is_terminal if live is None else live
        self.live: Live | None = None
        self.started = None
        self.step = None
        self.eval: dict[str, float] = {}
        self.losses: list[float] = []
        self.loss_steps: list[int] = []
        self.val_losses: tuple[list[int], list[float]] = ([], [])
        import importlib.util

        # The chart is a view: without plotext the panel keeps the sparkline rather than stop a training.
        self.can_chart = importlib.util.find_spec("plotext") is not None
        self.phase = ""
        self.trainable = 0
        self.notes: list[str] = []
        self.last_plain = 0.0

    def __enter__(self):
        if self.live_mode:
            self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(*exc)
            self.live = None

    def __call__(self, event: Any) -> None:
        from appliance.train import events as ev

        if isinstance(event, ev.RunStarted):
            self.started = event
            self.trainable = event.trainable_params
            text = (
                f"[bold]training[/] {event.run_name} on {event.model} · {event.device} {event.dtype} · "
                f"{event.train_examples} train / {event.val_examples} val examples · "
                f"{human_count(event.trainable_params)} trainable of {human_count(event.total_params)} · {event.optimizer}"
            )
            if event.ranks > 1:
                per_step = event.batch_size * event.ranks * event.grad_accum
                text += f" · global batch {event.batch_size} × {event.ranks} ranks × {event.grad_accum} = {per_step} examples per step"
            if event.resumed_from:
                text += f" · resumed from {event.resumed_from}"
            self._print(text)
        elif isinstance(event, ev.PhaseChanged):
            self.phase = event.description
            self.trainable = event.trainable_params
            if event.step:
                self._print(f"step {event.step}: now training {event.description} ({human_count(event.trainable_params)} parameters)")
        elif isinstance(event, ev.StepDone):
            self.step = event
            self.losses.append(event.loss)
            self.loss_steps.append(event.step)
            if not self.live_mode:
                extra = "".join(f" {k}={v:.4g}" for k, v in event.extra.items())
                self._print(
                    f"step {event.step}/{event.total_steps} loss={event.loss:.4f} lr={event.lr:.2e} "
                    f"tok/s={event.tokens_per_s:.0f} mem={event.memory_gib:.2f}GiB "
                    f"elapsed={duration(event.elapsed_s)} eta={duration(event.eta_s)}{extra}"
                )
        elif isinstance(event, ev.EvalDone):
            self.eval = event.metrics
            if isinstance(event.metrics.get("val_loss"), (int, float)):
                self.val_losses[0].append(event.step)
                self.val_losses[1].append(event.metrics["val_loss"])
            figures = " ".join(f"{k}={v:.4f}" for k, v in event.metrics.items())
            self._print(f"eval at step {event.step}: {figures}" + (" (best)" if event.improved else ""))
        elif isinstance(event, ev.CheckpointSaved):
            self._print(f"checkpoint ({event.reason}) at step {event.step}: {event.path}")
        elif isinstance(event, ev.Note):
            style = "yellow" if event.level == "warning" else "dim"
            self._print(f"[{style}]{event.text}[/]")
        if self.live is not None:
            self.live.update(self._render())

    def _print(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text)
        else:
            self.console.print(text, highlight=False, soft_wrap=True)

    def _render(self):
        s = self.step
        table = Table(show_header=False, box=None, padding=(0, 2))
        table.add_column(style="bold cyan")
        table.add_column()
        if s is None:
            table.add_row("step", "starting…")
        else:
            table.add_row("step", f"{s.step}/{s.total_steps}  (epoch {s.epoch:.2f})")
            table.add_row("train loss", f"{s.loss:.4f}" if self._chart_width() else f"{s.loss:.4f}  {sparkline(self.losses)}")
            if self.eval:
                table.add_row("validation", "  ".join(f"{k} {v:.4f}" for k, v in self.eval.items()))
            table.add_row("learning rate", f"{s.lr:.2e}")
            table.add_row("tokens/s", f"{s.tokens_per_s:,.0f}")
            table.add_row("elapsed / ETA", f"{duration(s.elapsed_s)} / {duration(s.eta_s)}")
            table.add_row("memory", f"{s.memory_gib:.2f} GiB")
            for k, v in s.extra.items():
                table.add_row(k, f"{v:.4f}")
        table.add_row("trainable", f"{human_count(self.trainable)} ({self.phase})")
        title = f"appliance train · {self.started.run_name}" if self.started else "appliance train"
        parts = [table]
        width = self._chart_width()
        if width and len(self.losses) >= 2:
            series = {"train": (self.loss_steps, self.losses), "validation": self.val_losses}
            parts.append(Text.from_ansi(curve_chart("loss", series, width=width, height=12)))
        return Panel(Group(*parts), title=title, border_style="cyan", expand=False)

    def _chart_width(self) -> int:
        """The chart's width in the live panel; 0 where there is no live panel or too little room."""
        if not (self.live_mode and self.can_chart):
            return 0
        width = min(self.console.width - 4, 72)
        return width if width >= 40 else 0


class Spinner:
    """A status spinner on a terminal; a single line otherwise."""

    def __init__(self, text: str):
        self.text = text
        self.status = None
        self.t0 = time.time()

    def __enter__(self):
        if console.is_terminal:
            self.status = console.status(self.text)
            self.status.__enter__()
        else:  # on stderr: stdout may be JSON for a script (`--json`)
            err_console.print(self.text + " …")
        return self

    def update(self, text: str) -> None:
        self.text = text
        if self.status is not None:
            self.status.update(text)

    def stop(self) -> None:
        """End the spinner before its block ends (what follows prints for a while)."""
        if self.status is not None:
            self.status.stop()
            self.status = None

    def __exit__(self, *exc):
        self.stop()


def prompt(label: str) -> str | None:
    """A line the user types; None when they end the input (Ctrl-D) or interrupt (Ctrl-C)."""
    from rich.prompt import Prompt

    try:
        return Prompt.ask(label, console=console)
    except (EOFError, KeyboardInterrupt):
        console.print()
        return None


def stream_markdown(deltas: Iterable[str]) -> str:
    """Show text as it arrives, rendered as Markdown; returns the whole text."""
    from rich.markdown import Markdown

    text = ""
    with Live(Markdown(""), console=console, refresh_per_second=12) as live:
        for delta in deltas:
            text += delta
            live.update(Markdown(text))
    return text


def training_done(result, model: str) -> None:
    """Where the adapter went, its final figures, and the two next steps."""
    figures = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.metrics.items())
    console.print(f"[green]adapter saved[/] {result.adapter} → {result.adapter_dir}\n  {figures}  ({duration(result.elapsed_s)})")
    console.print(f"next: [bold]appliance merge {result.adapter}[/]  or  [bold]appliance serve {model} --adapter {result.adapter}[/]")


def service_table(info: dict, url: str, served: list[str]) -> Table:
    """`appliance service status`: the unit's systemd state beside what its endpoint serves."""
    state, memory = info["systemd"], info["systemd"].get("MemoryCurrent", "")
    return key_value_table({
        "unit": f"{info['record']['unit_name']} ({info['record']['scope']})",
        "state": f"{state.get('ActiveState')} / {state.get('SubState')}",
        "pid": state.get("MainPID"),
        "since": state.get("ActiveEnterTimestamp") or "-",
        "restarts": state.get("NRestarts", "0"),
        "memory": f"{int(memory) / 2**30:.2f} GiB" if memory.isdigit() else "-",
        "endpoint": f"{url}/v1",
        "served": ", ".join(served) or "(not answering)",
    }, title="appliance service")


def is_tty() -> bool:
    return sys.stdout.isatty()


def methods_table(figures, model: str):
    """`appliance bench methods`: per method, the held-out figures before → after and the training figures early → late."""
    from rich.table import Table

    def arrows(before: dict, after: dict) -> str:
        return "\n".join(f"{k} {before[k]:.3g} → {after[k]:.3g}" for k in after if k in before)

    table = Table("method", "held-out (before → after)", "training (steps 1-3 → last 3)", "time", title=f"methods on {model}")
    for f in figures:
        table.add_row(f"{f.method}\n[dim]{f.held_out} examples[/]", arrows(f.before, f.after), arrows(f.first_steps, f.last_steps), duration(f.train_s))
    return table


def endpoint_help(spec, api_key_env: str | None = None) -> str:
    names = spec.served_names
    key = f'\n  -H "Authorization: Bearer ${api_key_env}" \\' if api_key_env else ""
    curl = (
        f"curl {spec.url}/v1/chat/completions \\{key}\n"
        f"  -H 'Content-Type: application/json' \\\n"
        f"  -d '{{\"model\": \"{names[-1]}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'"
    )
    key_expr = f"os.environ[{api_key_env!r}]" if api_key_env else '"none"'
    sdk = (
        "from openai import OpenAI\n"
        f"client = OpenAI(base_url=\"{spec.url}/v1\", api_key={key_expr})\n"
        f"reply = client.chat.completions.create(model=\"{names[-1]}\", messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}])\n"
        "print(reply.choices[0].message.content)"
    )
    return f"[bold]curl[/]\n{curl}\n\n[bold]openai SDK[/]\n{sdk}"


def server_ready(spec, server, log, key) -> None:
    """`appliance serve`, once vLLM answers: where it is, what it serves, how to call it, and its key."""
    from rich.panel import Panel

    console.print(Panel(
        f"[green]ready[/] in {server.healthy_s:.0f} s at [bold]{spec.url}/v1[/]\n"
        f"served models: {', '.join(spec.served_names)}\npid {server.pid} · log {log}",
        title="appliance serve", border_style="green", expand=False,
    ))
    console.print(endpoint_help(spec, "APPLIANCE_API_KEY" if key.key else None), soft_wrap=True, highlight=False)
    if key.source == "generated":
        console.print(f"API key (new, for this run): export APPLIANCE_API_KEY={key.key}", soft_wrap=True, highlight=False)
    elif key.source == "service":
        console.print("API key: the installed service's (`appliance service key` prints it)")
    elif key.warning:
        warn(key.warning)
    console.print("[dim]appliance ask / chat / adapters find this server and its key while it runs. Ctrl-C stops it.[/]")


def shorten(text: str, limit: int = 140) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def quickstart_report(result) -> None:
    """`appliance quickstart`: before / after per question, timings, the training and merge figures, the score."""
    from rich.table import Table

    from appliance.quickstart import MERGED, score

    table = Table("", "question (never trained on)", "base (before)", f"{MERGED} via vLLM (after)", "", title="before / after", show_lines=True)
    for q, before, after in zip(result.questions, result.before, result.after):
        table.add_row(q.group, q.question, shorten(before), shorten(after), "[green]✓[/]" if q.right(after) else "[red]✗[/]")
    console.print(table)
    timings = Table("step", "seconds", title="timings")
    for name, seconds in result.timings.items():
        timings.add_row(name, f"{seconds:.0f}")
    timings.add_row("[bold]total[/]", f"[bold]{sum(result.timings.values()):.0f}[/]")
    console.print(timings)
    p = result.parity
    console.print(
        f"train loss {result.train_metrics.get('train_loss', float('nan')):.3f} · "
        f"val loss {result.train_metrics.get('val_loss', float('nan')):.3f} · "
        f"merged model vs the evaluated 4-bit model: top-1 {p.evaluated.top1_agreement:.0%} at clear positions, "
        f"mean KL {p.evaluated.mean_kl:.1e} · finish reasons: {', '.join(sorted(set(map(str, result.finish_reasons))))}",
        highlight=False,
    )
    before, after = score(result.questions, result.before), score(result.questions, result.after)
    for group, title in (("fact", "taught facts (asked as new paraphrases)"), ("control", "general-knowledge controls")):
        (right, asked), (base_right, _) = after[group], before[group]
        console.print(f"[bold]{right}/{asked}[/] {title} right after fine-tuning (base: {base_right}/{asked})")


def quickstart_next_steps() -> None:
    from appliance.quickstart import ADAPTER, MERGED

    console.print(
        "\nTry it yourself:\n"
        f"  appliance serve {MERGED}                      # the merged model\n"
        f"  appliance serve smollm2 --adapter {ADAPTER}   # or the base with the adapter\n"
        '  appliance ask "Which city is the capital of Zorvania?"\n'
        "  appliance chat"
    )

"""The terminal UI: the training dashboard as a log, errors as one panel, --json output kept clean."""

from __future__ import annotations

import io

from rich.console import Console

from appliance import ui
from appliance.train import events as ev


def _dashboard_text(events) -> str:
    out = io.StringIO()
    with ui.Dashboard(Console(file=out, width=200, force_terminal=False), live=False) as dash:
        for event in events:
            dash(event)
    return out.getvalue()


def test_the_dashboard_logs_each_event_when_not_on_a_terminal():
    text = _dashboard_text([
        ev.RunStarted(run_name="r1", model="smollm2", device="cpu", dtype="float32", total_steps=2, start_step=0, train_examples=30,
                      val_examples=4, trainable_params=1_500_000, total_params=135_000_000, optimizer="adamw", resumed_from=None),
        ev.StepDone(step=1, total_steps=2, loss=2.5, lr=1e-4, grad_norm=1.0, tokens_per_s=150.0, memory_gib=0.8, elapsed_s=3, eta_s=3,
                    epoch=0.5, extra={}),
        ev.EvalDone(step=1, metrics={"val_loss": 2.25}, improved=True),
        ev.Note(text="early stop", level="warning"),
    ])
    assert "1.5M trainable of 135.0M" in text
    assert "step 1/2 loss=2.5000" in text and "tok/s=150" in text
    assert "val_loss=2.2500 (best)" in text and "early stop" in text


def test_numbers_read_as_people_write_them():
    assert ui.duration(59) == "00:59" and ui.duration(3725) == "1:02:05" and ui.duration(-3) == "00:00"
    assert ui.human_count(134_515_008) == "134.5M" and ui.human_count(999) == "999"
    assert ui.sparkline([]) == "" and len(ui.sparkline(list(range(100)), width=40)) == 40


def test_json_output_sends_everything_else_to_stderr(capsys):
    with ui.json_output():
        ui.info("progress text")
    captured = capsys.readouterr()
    assert captured.out == "" and "progress text" in captured.err

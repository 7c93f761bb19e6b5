"""The one error type for user mistakes.

Every step raises `ApplianceError` for something the user can fix: a missing
file, a malformed line, a model that does not fit. It carries what went wrong
and how to fix it; the CLI prints both in a panel and exits non-zero. Any
other exception reaching the CLI is a bug and keeps its traceback.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """A user-fixable problem: `message` says what is wrong, `fix` what to do."""

    exit_code = 2

    def __init__(self, message: str, fix: str | None = None, *, details: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.details = details or []

    def __str__(self) -> str:
        parts = [self.message, *self.details]
        if self.fix:
            parts.append(f"Fix: {self.fix}")
        return "\n".join(parts)


class TrainingInterrupted(Exception):
    """Training stopped by a signal after saving a checkpoint; carries the exit code (130 or 143)."""

    def __init__(self, exit_code: int, checkpoint: str | None):
        super().__init__(f"interrupted (exit {exit_code})")
        self.exit_code = exit_code
        self.checkpoint = checkpoint

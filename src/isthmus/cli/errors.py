"""The CLI's own exceptions: expected failures, reported as one ``error: …`` line on stderr."""

from __future__ import annotations

import typer


class CliError(Exception):
    """An expected failure: reported as ``error: <message>`` on stderr, exit code 1."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CliUsageError(CliError):
    """A command line that cannot be acted on (exit code 2, like Click's usage errors)."""

    exit_code = 2

    def __init__(self, message: str, ctx: typer.Context | None = None) -> None:
        super().__init__(message)
        self.command_path = ctx.command_path if ctx is not None else None


class ApiError(CliError):
    """A management API call failed; the message is the sentence to show the user."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

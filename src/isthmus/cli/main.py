"""The ``isthmus`` command: the root group, its global options, ``serve`` and ``config``.

Every expected failure is one line on stderr, ``error: <what went wrong>``, and a non-zero exit
code: 1 when the command could not be carried out, 2 when the command line itself is wrong
(the code Click uses for usage errors). :class:`_RootGroup` is where that rule is enforced, so it
holds whether the command runs from the console script, ``python -m isthmus`` or a test's
``CliRunner``.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from typer.core import TyperGroup

from isthmus import __version__
from isthmus.cli.devices import ld_app, pd_app
from isthmus.cli.errors import CliError, CliUsageError
from isthmus.cli.mappings import map_app
from isthmus.cli.output import ACCESS_PANEL, DEVICES_PANEL, FLOW_PANEL, SERVER_PANEL, print_json
from isthmus.cli.session import Session, session
from isthmus.cli.telemetry import dlq_app, flow_app
from isthmus.cli.users import users_app

PROG_NAME = "isthmus"


class _RootGroup(TyperGroup):
    """The root command group: turns every failure into one ``error: …`` line and an exit code."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except Exception as exc:  # noqa: BLE001 - the one place every failure is reported
            sys.exit(report(exc))
        sys.exit(result if isinstance(result, int) else 0)


def report(exc: BaseException) -> int:
    """Print ``exc`` as one ``error: …`` line on stderr and return the exit code to use."""
    from isthmus.errors import IsthmusError

    code = 1
    hint_path: str | None = None
    if isinstance(exc, CliError):
        message, code = exc.message, exc.exit_code
        if isinstance(exc, CliUsageError):
            hint_path = exc.command_path
    elif isinstance(exc, typer.TyperException):  # Click's usage errors and friends
        message = exc.format_message()
        code = int(getattr(exc, "exit_code", 1))
        ctx = getattr(exc, "ctx", None)
        if code == 2 and ctx is not None:
            hint_path = str(ctx.command_path)
    elif isinstance(exc, typer.Abort):
        message = "aborted"
    elif isinstance(exc, OSError) and exc.errno == errno.EPIPE:
        _silence_stdout()  # the reader went away (`isthmus pd ls | head`): nothing to say
        return 1
    elif isinstance(exc, IsthmusError):
        message = str(exc) or type(exc).__name__
    elif isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        message = f"{exc.strerror or exc}{where}"
    else:
        message = f"internal error: {type(exc).__name__}: {exc}{_where(exc)} — please report it"
    line = " ".join(message.split())
    if hint_path:
        line += f" (see '{hint_path} --help')"
    typer.echo(f"error: {line}", err=True)
    return code


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" at {Path(last.filename).name}:{last.lineno}"


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # pragma: no cover - stdout without a file descriptor
        pass


def _version(value: bool) -> None:
    if value:
        typer.echo(f"{PROG_NAME} {__version__}")
        raise typer.Exit


app = typer.Typer(
    name=PROG_NAME,
    cls=_RootGroup,
    help=(
        "Isthmus, an IoT telemetry gateway: run the server, and manage devices, mappings, users "
        "and deliveries through its management API."
    ),
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="PATH",
        help="The TOML configuration file; overrides the global --config.",
        show_default=False,
        dir_okay=False,
    ),
]


@app.callback()
def root(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            envvar="ISTHMUS_URL",
            metavar="URL",
            help="Base URL of the server (default: http://HOST:PORT from the configuration's http section).",
            show_default=False,
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="ISTHMUS_TOKEN",
            metavar="TOKEN",
            help="API token (default: the admin token the server wrote to DATA_DIR/admin.token).",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="ISTHMUS_CONFIG",
            metavar="PATH",
            help="The TOML configuration file (default: built-in defaults and ISTHMUS_* variables).",
            show_default=False,
            dir_okay=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Isthmus, an IoT telemetry gateway."""
    # A test may hand in an httpx transport as the context object (CliRunner.invoke(..., obj=…)).
    transport = ctx.obj if isinstance(ctx.obj, httpx.BaseTransport) else None
    ctx.obj = Session(url_option=url, token_option=token, config_path=config, env=dict(os.environ), transport=transport)


@app.command("serve", rich_help_panel=SERVER_PANEL)
def serve_command(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Run the Isthmus server in the foreground until SIGINT or SIGTERM."""
    from isthmus.errors import IsthmusError

    state = session(ctx)
    if config is not None:
        state.config_path = config
    settings = state.config()
    from isthmus.runtime.supervisor import serve

    try:
        serve(settings)
    except IsthmusError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot serve: {exc.strerror or exc}") from None


config_app = typer.Typer(name="config", help="Check the configuration.", add_completion=False)


@config_app.command("check")
def config_check(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Validate the configuration and print its effective values as JSON (secrets masked)."""
    state = session(ctx)
    if config is not None:
        state.config_path = config
    settings = state.config()
    print_json(redact(settings.model_dump(mode="json")))
    where = state.config_path if state.config_path is not None else "built-in defaults"
    typer.echo(f"configuration is valid ({where} and ISTHMUS_* environment variables)", err=True)


_SECRET_KEY = re.compile(r"pass(word)?|secret|token|api[_-]?key|credential", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@/\s]+@")


def redact(value: Any, key: str = "") -> Any:
    """``value`` with secrets masked: values of secret-looking keys and passwords inside URLs."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if value and _SECRET_KEY.search(key):
            return "***"
        return _URL_PASSWORD.sub(r"\1***@", value)
    return value


app.add_typer(config_app, rich_help_panel=SERVER_PANEL)
app.add_typer(pd_app, rich_help_panel=DEVICES_PANEL)
app.add_typer(ld_app, rich_help_panel=DEVICES_PANEL)
app.add_typer(map_app, rich_help_panel=DEVICES_PANEL)
app.add_typer(flow_app)  # ts, messages, sinks
app.add_typer(dlq_app, rich_help_panel=FLOW_PANEL)
app.add_typer(users_app, rich_help_panel=ACCESS_PANEL)


def main() -> None:
    """Console-script entry point (``isthmus``)."""
    app(prog_name=PROG_NAME)

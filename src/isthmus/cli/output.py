"""Shared helpers of the commands: JSON in and out, Rich tables, option checks."""

from __future__ import annotations

import base64
import binascii
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from isthmus.cli.errors import CliError, CliUsageError

PREVIEW_CHARS = 60

# The panels of `isthmus --help`, in the order they appear.
SERVER_PANEL, DEVICES_PANEL, FLOW_PANEL, ACCESS_PANEL = "Server", "Devices", "Data flow", "Access"


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout (the default output, like IoTa's broker-cli)."""
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def print_table(columns: Sequence[str | Column], rows: Iterable[Sequence[str | Text]], *, empty: str) -> None:
    """Print a Rich table on stdout, or ``empty`` (to stderr) when there are no rows."""
    table = Table(
        *columns, header_style="bold", highlight=False, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
    )
    count = 0
    for row in rows:
        table.add_row(*row)
        count += 1
    if count == 0:
        typer.echo(empty, err=True)
        return
    Console(highlight=False).print(table)


def without_properties(item: Any, keep: bool) -> Any:
    """Drop the ``properties`` field from a device (or each device of a list) unless ``keep``."""
    if keep:
        return item
    if isinstance(item, list):
        return [without_properties(x, keep) for x in item]
    if isinstance(item, dict):
        return {k: v for k, v in item.items() if k != "properties"}
    return item


def exactly_one(ctx: typer.Context, options: Mapping[str, object]) -> str:
    """Check that exactly one of ``options`` (flag name -> value) was given; return its name."""
    given = [name for name, value in options.items() if value is not None and value is not False]
    if len(given) == 1:
        return given[0]
    choices = " | ".join(options)
    if not given:
        raise CliUsageError(f"one of ({choices}) is required", ctx)
    raise CliUsageError(f"{' and '.join(given)} cannot be combined: give exactly one of ({choices})", ctx)


def read_json_object(ctx: typer.Context, json_text: str | None, file: str | None) -> dict[str, Any]:
    """The JSON object given by ``--json TEXT`` or ``--file PATH`` (``--file -``: stdin)."""
    if json_text is not None and file is not None:
        raise CliUsageError("--json and --file cannot be combined: give exactly one of them", ctx)
    if json_text is not None:
        text, where = json_text, "--json"
    elif file is not None:
        text, where = _read_file(file)
    else:
        raise CliUsageError("one of (--json TEXT | --file PATH) is required; --file - reads standard input", ctx)
    if not text.strip():
        raise CliError(f"{where} is empty: expected a JSON object")
    try:
        data = json.loads(text, parse_constant=lambda name: _bad_constant(where, name))
    except json.JSONDecodeError as exc:
        raise CliError(
            f"invalid JSON in {where}: {exc.msg} at line {exc.lineno}, column {exc.colno} (character {exc.pos})"
        ) from None
    if not isinstance(data, dict):
        raise CliError(f"{where} must hold a JSON object ({{...}}), not {_json_kind(data)}")
    return data


def _read_file(file: str) -> tuple[str, str]:
    if file == "-":
        try:
            return sys.stdin.read(), "standard input"
        except UnicodeDecodeError:
            raise CliError("standard input is not UTF-8 text") from None
    path = Path(file)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except FileNotFoundError:
        raise CliError(f"cannot read --file {path}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"cannot read --file {path}: it is a directory") from None
    except UnicodeDecodeError:
        raise CliError(f"cannot read --file {path}: not UTF-8 text") from None
    except OSError as exc:
        raise CliError(f"cannot read --file {path}: {exc.strerror or exc}") from None


def _bad_constant(where: str, name: str) -> NoReturn:
    raise CliError(f"invalid JSON in {where}: {name} is not a JSON value")


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def check_timestamp(option: str, value: str | None, ctx: typer.Context) -> str | None:
    """Reject a ``--since``/``--until`` value that is not ISO-8601 before asking the server."""
    if value is None:
        return None
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise CliUsageError(
            f"{option} {value!r} is not an ISO-8601 timestamp (e.g. 2024-05-06T10:30:00Z)", ctx
        ) from None
    return value


def cell(value: Any) -> str:
    """A table cell for any JSON value (``None`` is blank, strings as they are, the rest as JSON)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def when(value: Any) -> str:
    """An ISO-8601 timestamp shortened for a table: ``2024-05-06 10:30:00Z`` (to the second)."""
    if not isinstance(value, str):
        return cell(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    offset = moment.utcoffset()
    if offset is None:
        return text
    if not offset:
        return text + "Z"
    return text + moment.strftime("%z")


def preview(record: Mapping[str, Any]) -> Text:
    """A one-line preview of a raw message's payload, or its error in red."""
    error = record.get("error")
    if error:
        return Text(truncate(" ".join(str(error).split())), style="red")
    payload = record.get("payload")
    if payload is None:
        return Text("")
    if record.get("payload_encoding") == "base64":
        try:
            size = len(base64.b64decode(str(payload), validate=True))
        except (binascii.Error, ValueError):
            return Text("<invalid base64>", style="red")
        return Text(f"<{size} bytes, base64>", style="dim")
    return Text(truncate(" ".join(str(payload).split())))


def truncate(text: str, limit: int = PREVIEW_CHARS) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"

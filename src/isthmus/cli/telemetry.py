"""What flowed through Isthmus: ``ts``, ``messages``, ``dlq`` and ``sinks``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

import typer
from rich.table import Column
from rich.text import Text

from isthmus.cli.output import (
    FLOW_PANEL,
    cell,
    check_timestamp,
    exactly_one,
    preview,
    print_json,
    print_table,
    when,
)
from isthmus.cli.session import session

# ts, messages and sinks are top-level commands; a nameless Typer merges them into the root
# group in the place it is added, so --help lists them after the device commands.
flow_app = typer.Typer(add_completion=False)
dlq_app = typer.Typer(
    name="dlq",
    help="Dead letters: records a sink gave up on, with the reason.",
    add_completion=False,
)

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Since = Annotated[
    str | None,
    typer.Option("--since", metavar="ISO", help="Only from this ISO-8601 time on (inclusive).", show_default=False),
]
Until = Annotated[
    str | None,
    typer.Option("--until", metavar="ISO", help="Only before this ISO-8601 time.", show_default=False),
]
Limit = Annotated[
    int | None,
    typer.Option(
        "--limit",
        metavar="N",
        min=1,
        help="At most this many rows (default: the server's).",
        show_default=False,
    ),
]

_STATE_STYLES = {"healthy": "green", "retrying": "yellow", "failing": "red", "starting": "cyan"}
_STATUS_STYLES = {"ok": "green", "decode_error": "red", "quarantined": "yellow"}


def _styled(value: Any, styles: dict[str, str]) -> Text:
    text = cell(value)
    return Text(text, style=styles.get(text, ""))


def _rows(data: Any) -> list[dict[str, Any]]:
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def _corr() -> Column:
    return Column("correlation id", no_wrap=True, min_width=36)


def _fixed(header: str, *, right: bool = False) -> Column:
    return Column(header, no_wrap=True, justify="right" if right else "left")


def _rest(header: str) -> Column:
    """The last, free-text column: the one that wraps when the terminal is narrow."""
    return Column(header, overflow="fold", min_width=16)


@flow_app.command("ts", rich_help_panel=FLOW_PANEL)
def ts(
    ctx: typer.Context,
    luid: Annotated[
        int,
        typer.Option("--luid", metavar="LUID", min=1, help="The logical device's uid.", show_default=False),
    ],
    name: Annotated[
        str | None, typer.Option("--name", metavar="NAME", help="Only this series name.", show_default=False)
    ] = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = None,
    as_json: AsJson = False,
) -> None:
    """Print the stored time-series points of logical device LUID, oldest first."""
    params = {
        "l_uid": luid,
        "name": name,
        "since": check_timestamp("--since", since, ctx),
        "until": check_timestamp("--until", until, ctx),
        "limit": limit,
    }
    with session(ctx).client() as api:
        points = api.get("/mgmt/timeseries", params)
    if as_json:
        print_json(points)
        return
    rows: Iterable[list[str | Text]] = (
        [when(p.get("timestamp")), cell(p.get("name")), cell(p.get("value")), cell(p.get("correlation_id"))]
        for p in _rows(points)
    )
    columns: list[str | Column] = [_fixed("timestamp"), "name", Column("value", justify="right"), _corr()]
    print_table(columns, rows, empty="no points")


@flow_app.command("messages", rich_help_panel=FLOW_PANEL)
def messages(
    ctx: typer.Context,
    puid: Annotated[
        int | None,
        typer.Option("--puid", metavar="PUID", min=1, help="Messages from this physical device.", show_default=False),
    ] = None,
    luid: Annotated[
        int | None,
        typer.Option(
            "--luid",
            metavar="LUID",
            min=1,
            help="Messages mapped to this logical device.",
            show_default=False,
        ),
    ] = None,
    unmapped: Annotated[bool, typer.Option("--unmapped", help="Messages that reached no logical device.")] = False,
    status: Annotated[
        str | None,
        typer.Option(
            "--status",
            metavar="STATUS",
            help="Only this status: ok, decode_error, quarantined.",
            show_default=False,
        ),
    ] = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = None,
    as_json: AsJson = False,
) -> None:
    """Print raw messages as received, newest first, with their correlation ids and status."""
    exactly_one(ctx, {"--puid": puid, "--luid": luid, "--unmapped": unmapped})
    params = {
        "p_uid": puid,
        "l_uid": luid,
        "unmapped": True if unmapped else None,
        "status": status,
        "since": check_timestamp("--since", since, ctx),
        "until": check_timestamp("--until", until, ctx),
        "limit": limit,
    }
    with session(ctx).client() as api:
        found = api.get("/mgmt/messages", params)
    if as_json:
        print_json(found)
        return
    rows: Iterable[list[str | Text]] = (
        [
            cell(m.get("seq")),
            when(m.get("received_at")),
            cell(m.get("correlation_id")),
            _styled(m.get("status"), _STATUS_STYLES),
            cell(m.get("l_uid")),
            preview(m),
        ]
        for m in _rows(found)
    )
    columns = [
        _fixed("seq", right=True),
        _fixed("received at"),
        _corr(),
        _fixed("status"),
        _fixed("l_uid", right=True),
        _rest("payload / error"),
    ]
    print_table(columns, rows, empty="no messages")


@flow_app.command("sinks", rich_help_panel=FLOW_PANEL)
def sinks(ctx: typer.Context, as_json: AsJson = False) -> None:
    """Print each sink's health, position and counters."""
    with session(ctx).client() as api:
        found = api.get("/mgmt/sinks")
    if as_json:
        print_json(found)
        return
    rows: Iterable[list[str | Text]] = (
        [
            cell(s.get("name")),
            cell(s.get("type")),
            _styled(s.get("state"), _STATE_STYLES),
            cell(s.get("cursor")),
            cell(s.get("lag")),
            cell(s.get("delivered")),
            cell(s.get("dead_lettered")),
            cell(s.get("skipped")),
            Text(cell(s.get("last_error")), style="red"),
        ]
        for s in _rows(found)
    )
    numeric = ["cursor", "lag", "delivered", "dead-lettered", "skipped"]
    columns = [_fixed("name"), _fixed("type"), _fixed("state")]
    columns += [_fixed(n, right=True) for n in numeric]
    columns.append(_rest("last error"))
    print_table(columns, rows, empty="no sinks configured")


@dlq_app.command("ls")
def dlq_ls(
    ctx: typer.Context,
    sink: Annotated[
        str | None,
        typer.Option("--sink", metavar="SINK", help="Only this sink's dead letters.", show_default=False),
    ] = None,
    after_id: Annotated[
        int | None,
        typer.Option(
            "--after-id",
            metavar="ID",
            min=0,
            help="Only dead letters with a larger id (paging).",
            show_default=False,
        ),
    ] = None,
    limit: Limit = None,
    as_json: AsJson = False,
) -> None:
    """List dead letters, oldest first."""
    with session(ctx).client() as api:
        found = api.get("/mgmt/dead-letters", {"sink": sink, "after_id": after_id, "limit": limit})
    if as_json:
        print_json(found)
        return
    rows: Iterable[list[str | Text]] = (
        [
            cell(d.get("id")),
            cell(d.get("sink")),
            cell(d.get("seq")),
            cell(d.get("correlation_id")),
            cell(d.get("stage")),
            cell(d.get("attempts")),
            when(d.get("created_at")),
            Text(cell(d.get("reason")), style="red"),
        ]
        for d in _rows(found)
    )
    columns = [
        _fixed("id", right=True),
        _fixed("sink"),
        _fixed("seq", right=True),
        _corr(),
        _fixed("stage"),
        _fixed("attempts", right=True),
        _fixed("created at"),
        _rest("reason"),
    ]
    print_table(columns, rows, empty="no dead letters")


@dlq_app.command("show")
def dlq_show(
    ctx: typer.Context,
    dead_letter_id: Annotated[
        int, typer.Argument(metavar="ID", min=1, help="The dead letter's id.", show_default=False)
    ],
) -> None:
    """Print one dead letter as JSON, with its payload and message."""
    with session(ctx).client() as api:
        print_json(api.get(f"/mgmt/dead-letters/{dead_letter_id}"))


@dlq_app.command("redrive")
def dlq_redrive(
    ctx: typer.Context,
    sink: Annotated[str, typer.Option("--sink", help="The sink whose dead letters to deliver again.")],
    ids: Annotated[
        list[int] | None,
        typer.Option("--id", min=1, help="A dead letter id (repeatable); default: the oldest not yet redriven."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Most dead letters to redrive without --id.")] = 1000,
) -> None:
    """Deliver dead letters to their sink again; delivered ones are marked redriven."""
    body: dict[str, object] = {"sink": sink, "limit": limit}
    if ids:
        body["ids"] = ids
    with session(ctx).client() as api:
        print_json(api.post("/mgmt/dead-letters/redrive", body))

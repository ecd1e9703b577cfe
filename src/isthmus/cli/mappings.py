"""``isthmus map``: which physical device currently feeds which logical device."""

from __future__ import annotations

from typing import Annotated

import typer

from isthmus.cli.output import exactly_one, print_json
from isthmus.cli.session import session

map_app = typer.Typer(
    name="map",
    help="Mappings from physical to logical devices: start, end, pause, resume and history.",
    add_completion=False,
)

PUid = Annotated[
    int, typer.Option("--puid", metavar="PUID", min=1, help="The physical device's uid.", show_default=False)
]
LUid = Annotated[
    int, typer.Option("--luid", metavar="LUID", min=1, help="The logical device's uid.", show_default=False)
]
PUidOr = Annotated[
    int | None,
    typer.Option(
        "--puid",
        metavar="PUID",
        min=1,
        help="The physical device's uid (or give --luid).",
        show_default=False,
    ),
]
LUidOr = Annotated[
    int | None,
    typer.Option(
        "--luid", metavar="LUID", min=1, help="The logical device's uid (or give --puid).", show_default=False
    ),
]


@map_app.command("start")
def map_start(ctx: typer.Context, puid: PUid, luid: LUid) -> None:
    """Map physical device PUID to logical device LUID from now on; print the new mapping.

    Any current mapping of either device is ended first.
    """
    with session(ctx).client() as api:
        print_json(api.post("/mgmt/mappings", {"p_uid": puid, "l_uid": luid}))


@map_app.command("end")
def map_end(ctx: typer.Context, puid: PUidOr = None, luid: LUidOr = None) -> None:
    """End the current mapping of a physical or a logical device; print the ended mapping."""
    body = _one_device(ctx, puid, luid)
    with session(ctx).client() as api:
        print_json(api.post("/mgmt/mappings/end", body))


@map_app.command("ls")
def map_ls(ctx: typer.Context, puid: PUidOr = None, luid: LUidOr = None) -> None:
    """Print the current mapping and the mapping history of a physical or a logical device."""
    body = _one_device(ctx, puid, luid)
    with session(ctx).client() as api:
        print_json(api.get("/mgmt/mappings", body))


@map_app.command("pause")
def map_pause(ctx: typer.Context, puid: PUid) -> None:
    """Pause the current mapping of physical device PUID: its messages stop reaching the logical device."""
    with session(ctx).client() as api:
        print_json(api.post("/mgmt/mappings/pause", {"p_uid": puid}))


@map_app.command("resume")
def map_resume(ctx: typer.Context, puid: PUid) -> None:
    """Resume the paused mapping of physical device PUID."""
    with session(ctx).client() as api:
        print_json(api.post("/mgmt/mappings/resume", {"p_uid": puid}))


def _one_device(ctx: typer.Context, puid: int | None, luid: int | None) -> dict[str, int]:
    exactly_one(ctx, {"--puid": puid, "--luid": luid})
    return {"p_uid": puid} if puid is not None else {"l_uid": luid} if luid is not None else {}

"""``isthmus users``: management API users and their tokens."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

import typer

from isthmus.cli.output import cell, exactly_one, print_json, print_table, when
from isthmus.cli.session import session

users_app = typer.Typer(
    name="users",
    help="Users of the management API: add, remove, change passwords, manage tokens.",
    add_completion=False,
)

Username = Annotated[str, typer.Option("--username", "-u", help="The user's name.", show_default=False)]
Password = Annotated[
    str,
    typer.Option(
        "--password",
        "-p",
        help="The password; prompted for (hidden) when left out.",
        prompt=True,
        hide_input=True,
        confirmation_prompt=True,
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _user_path(username: str) -> str:
    return f"/mgmt/users/{quote(username, safe='')}"


@users_app.command("add")
def users_add(
    ctx: typer.Context,
    username: Username,
    password: Password,
    read_only: Annotated[bool, typer.Option("--read-only", help="The user may read but not change anything.")] = False,
    disabled: Annotated[
        bool, typer.Option("--disabled", "-d", help="Create the user with its token disabled.")
    ] = False,
) -> None:
    """Create a user and print its new API token."""
    body = {"username": username, "password": password, "read_only": read_only, "enabled": not disabled}
    with session(ctx).client() as api:
        answer = api.post("/mgmt/users", body)
    token = answer.get("token") if isinstance(answer, dict) else None
    if token:
        typer.echo(token)
    else:
        typer.echo(f"user {username!r} created (its token is disabled)", err=True)


@users_app.command("rm")
def users_rm(ctx: typer.Context, username: Username) -> None:
    """Remove a user (its token stops working at once)."""
    with session(ctx).client() as api:
        api.delete(_user_path(username))
    typer.echo(f"user {username!r} removed")


@users_app.command("token")
def users_token(
    ctx: typer.Context,
    username: Username,
    refresh: Annotated[bool, typer.Option("--refresh", help="Replace the token with a new one and print it.")] = False,
    disable: Annotated[bool, typer.Option("--disable", help="Disable the token (requests with it get 401).")] = False,
    enable: Annotated[bool, typer.Option("--enable", help="Enable the token again.")] = False,
) -> None:
    """Refresh, disable or enable a user's token."""
    action = exactly_one(ctx, {"--refresh": refresh, "--disable": disable, "--enable": enable}).removeprefix("--")
    with session(ctx).client() as api:
        answer = api.post(f"{_user_path(username)}/token", {"action": action})
    token = answer.get("token") if isinstance(answer, dict) else None
    if token and action != "disable":
        typer.echo(token)
    else:
        done = {"refresh": "refreshed", "disable": "disabled", "enable": "enabled"}[action]
        typer.echo(f"token of user {username!r} {done}")


@users_app.command("chng")
def users_chng(ctx: typer.Context, username: Username, password: Password) -> None:
    """Change a user's password."""
    with session(ctx).client() as api:
        api.put(f"{_user_path(username)}/password", {"password": password})
    typer.echo(f"password of user {username!r} changed")


@users_app.command("ls")
def users_ls(ctx: typer.Context, as_json: AsJson = False) -> None:
    """List the users."""
    with session(ctx).client() as api:
        users: Any = api.get("/mgmt/users")
    if as_json:
        print_json(users)
        return
    rows = (
        (
            [
                cell(u.get("username")),
                _yes_no(u.get("read_only")),
                _yes_no(u.get("enabled")),
                when(u.get("created_at")),
            ]
            for u in users
            if isinstance(u, dict)
        )
        if isinstance(users, list)
        else ()
    )
    print_table(["username", "read-only", "enabled", "created at"], rows, empty="no users")


def _yes_no(value: Any) -> str:
    if value is None:
        return ""
    return "yes" if value else "no"

"""``isthmus pd`` and ``isthmus ld``: physical and logical devices, as in IoTa's broker-cli."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Annotated, Any

import typer

from isthmus.cli.client import ApiClient
from isthmus.cli.errors import CliUsageError
from isthmus.cli.output import exactly_one, print_json, read_json_object, without_properties
from isthmus.cli.session import session

pd_app = typer.Typer(
    name="pd",
    help="Physical devices: the sensors in the field, as they appear to a source.",
    add_completion=False,
)
ld_app = typer.Typer(
    name="ld",
    help="Logical devices: the destinations whose time series outlive any one physical device.",
    add_completion=False,
)

PUid = Annotated[
    int, typer.Option("--puid", metavar="PUID", min=1, help="The physical device's uid.", show_default=False)
]
LUid = Annotated[
    int, typer.Option("--luid", metavar="LUID", min=1, help="The logical device's uid.", show_default=False)
]
Properties = Annotated[
    bool,
    typer.Option(
        "--properties", help="Include the free-form properties field (left out by default to reduce clutter)."
    ),
]
Plain = Annotated[
    bool,
    typer.Option("--plain", help="One line per device instead of JSON: uid, name, source and current mapping."),
]
LdPlain = Annotated[
    bool,
    typer.Option("--plain", help="One line per device instead of JSON: uid, name and the physical device feeding it."),
]
Source = Annotated[
    str | None,
    typer.Option("--source", metavar="SOURCE", help="Only devices of this source (http, mqtt, …).", show_default=False),
]
JsonText = Annotated[
    str | None,
    typer.Option("--json", metavar="JSON", help="The JSON object, inline.", show_default=False),
]
JsonFile = Annotated[
    str | None,
    typer.Option(
        "--file",
        metavar="PATH",
        help="Read the JSON object from a file; '-' reads standard input.",
        show_default=False,
    ),
]
Username = Annotated[
    str | None,
    typer.Option(
        "--username",
        "-u",
        metavar="USERNAME",
        help="Set the credential with this username (1 to 200 characters, unique across devices).",
        show_default=False,
    ),
]
DevicePassword = Annotated[
    str | None,
    typer.Option(
        "--password",
        "-p",
        metavar="PASSWORD",
        help="The password. Left out: asked for (hidden, twice) on a terminal, else the first line of "
        "standard input — better than this option, which other users of the machine can see.",
        show_default=False,
    ),
]
Remove = Annotated[
    bool, typer.Option("--remove", help="Remove the device's username and password (its token keeps working).")
]


# --- physical devices -------------------------------------------------------------------------


@pd_app.command("get")
def pd_get(ctx: typer.Context, puid: PUid, properties: Properties = False) -> None:
    """Print the physical device PUID as JSON."""
    with session(ctx).client() as api:
        device = api.get(f"/mgmt/physical/{puid}", {"properties": properties})
    print_json(without_properties(device, properties))


@pd_app.command("ls")
def pd_ls(ctx: typer.Context, source: Source = None, properties: Properties = False, plain: Plain = False) -> None:
    """List physical devices, mapped and unmapped, as JSON (or one line each with --plain)."""
    _list_physical(ctx, source=source, properties=properties, plain=plain, unmapped=False)


@pd_app.command("lum")
def pd_lum(ctx: typer.Context, source: Source = None, properties: Properties = False, plain: Plain = False) -> None:
    """List the physical devices that are not mapped to a logical device."""
    _list_physical(ctx, source=source, properties=properties, plain=plain, unmapped=True)


@pd_app.command("create")
def pd_create(ctx: typer.Context, json_text: JsonText = None, file: JsonFile = None) -> None:
    """Create a physical device from a JSON object and print it (its uid and token included).

    Example: isthmus pd create --json '{"name": "tank-7", "source_name": "http"}'
    """
    body = read_json_object(ctx, json_text, file)
    with session(ctx).client() as api:
        print_json(api.post("/mgmt/physical", body))


@pd_app.command("up")
def pd_up(ctx: typer.Context, puid: PUid, json_text: JsonText = None, file: JsonFile = None) -> None:
    """Update the physical device PUID with the fields of a JSON object; print the result.

    Only the fields present in the object change.
    """
    body = read_json_object(ctx, json_text, file)
    with session(ctx).client() as api:
        print_json(api.patch(f"/mgmt/physical/{puid}", body))


@pd_app.command("rm")
def pd_rm(ctx: typer.Context, puid: PUid) -> None:
    """Delete the physical device PUID and print it as it was."""
    with session(ctx).client() as api:
        print_json(api.delete(f"/mgmt/physical/{puid}"))


@pd_app.command("credentials")
def pd_credentials(
    ctx: typer.Context,
    puid: PUid,
    username: Username = None,
    password: DevicePassword = None,
    remove: Remove = False,
) -> None:
    """Set the username and password the device PUID connects with over MQTT, or --remove them.

    Replaces any username and password the device had. Prints the device, never the password.

    Example: isthmus pd credentials --puid 1 --username tank-7   (asks for the password)
    """
    action = exactly_one(ctx, {"--username": username, "--remove": remove})
    if action == "--remove" and password is not None:
        raise CliUsageError("--password cannot be combined with --remove", ctx)
    with session(ctx).client() as api:
        if action == "--remove":
            device = api.delete(f"/mgmt/physical/{puid}/credentials")
        else:
            secret = password if password is not None else _read_password(ctx)
            device = api.put(f"/mgmt/physical/{puid}/credentials", {"username": username, "password": secret})
    print_json(without_properties(device, False))


@pd_app.command("state")
def pd_state(ctx: typer.Context, puid: PUid) -> None:
    """Print whether the device PUID is online (connected through a source), since when, and its last_seen."""
    with session(ctx).client() as api:
        print_json(api.get(f"/mgmt/physical/{puid}/state"))


@pd_app.command("attrs")
def pd_attrs(ctx: typer.Context, puid: PUid, json_text: JsonText = None, file: JsonFile = None) -> None:
    """Print the device's client and shared attributes; with --json or --file, first set shared attributes.

    Shared attributes set here are pushed at once to the device if it is connected and subscribed
    (MQTT v1/devices/me/attributes), or queued in its persistent session.

    Example: isthmus pd attrs --puid 1 --json '{"interval": 60}'
    """
    body = read_json_object(ctx, json_text, file) if json_text is not None or file is not None else None
    with session(ctx).client() as api:
        if body is not None:
            api.put(f"/mgmt/physical/{puid}/attributes", body)
        print_json(api.get(f"/mgmt/physical/{puid}/attributes"))


@pd_app.command("rpc")
def pd_rpc(
    ctx: typer.Context,
    puid: PUid,
    method: Annotated[str, typer.Option("--method", metavar="METHOD", help="The method to call.", show_default=False)],
    params: Annotated[str, typer.Option("--params", metavar="JSON", help="Its parameters, any JSON value.")] = "{}",
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, max=300, help="Seconds to wait for the device's answer.")
    ] = 10.0,
    oneway: Annotated[bool, typer.Option("--oneway", help="Send without waiting for an answer.")] = False,
) -> None:
    """Call METHOD on the device PUID (server-side RPC) and print its answer.

    Fails when no connection or persistent session of the device takes RPC requests (409) or
    the device does not answer within --timeout seconds (504).

    Example: isthmus pd rpc --puid 1 --method setValve --params '{"open": true}'
    """
    try:
        value = json.loads(params)
    except json.JSONDecodeError as exc:
        raise CliUsageError(f"--params is not JSON: {exc}", ctx) from None
    current = session(ctx)
    waiting = dataclasses.replace(current, timeout=max(current.timeout, timeout + 5))
    body = {"method": method, "params": value, "timeout": timeout, "oneway": oneway}
    with waiting.client() as api:
        print_json(api.post(f"/mgmt/physical/{puid}/rpc", body))


def _list_physical(ctx: typer.Context, *, source: str | None, properties: bool, plain: bool, unmapped: bool) -> None:
    params = {
        "source": source,
        "properties": properties and not plain,
        "unmapped": True if unmapped else None,
    }
    with session(ctx).client() as api:
        devices = _as_list(api.get("/mgmt/physical", params))
        if not plain:
            print_json(without_properties(devices, properties))
            return
        logical: dict[int, str] = {}
        mappings: dict[int, dict[str, Any] | None] = {}
        if not unmapped and devices:
            logical = _names(api.get("/mgmt/logical", {"properties": False}))
            for device in devices:
                uid = device.get("uid")
                if isinstance(uid, int):
                    mappings[uid] = _current_mapping(api, p_uid=uid)
    for device in devices:
        target = _mapped(mappings, device, "->", "l_uid", logical)
        uid, name, source = device.get("uid", "?"), device.get("name", ""), device.get("source_name", "")
        typer.echo(f"{uid:>4} {name:<40} {source:<8} {target}".rstrip())


# --- logical devices --------------------------------------------------------------------------


@ld_app.command("get")
def ld_get(ctx: typer.Context, luid: LUid, properties: Properties = False) -> None:
    """Print the logical device LUID as JSON."""
    with session(ctx).client() as api:
        device = api.get(f"/mgmt/logical/{luid}", {"properties": properties})
    print_json(without_properties(device, properties))


@ld_app.command("ls")
def ld_ls(ctx: typer.Context, properties: Properties = False, plain: LdPlain = False) -> None:
    """List logical devices as JSON (or one line each with --plain, with the physical device feeding it)."""
    with session(ctx).client() as api:
        devices = _as_list(api.get("/mgmt/logical", {"properties": properties and not plain}))
        if not plain:
            print_json(without_properties(devices, properties))
            return
        physical: dict[int, str] = {}
        mappings: dict[int, dict[str, Any] | None] = {}
        if devices:
            physical = _names(api.get("/mgmt/physical", {"properties": False}))
            for device in devices:
                uid = device.get("uid")
                if isinstance(uid, int):
                    mappings[uid] = _current_mapping(api, l_uid=uid)
    for device in devices:
        source = _mapped(mappings, device, "<-", "p_uid", physical)
        typer.echo(f"{device.get('uid', '?'):>4} {device.get('name', ''):<40} {source}".rstrip())


@ld_app.command("create")
def ld_create(ctx: typer.Context, json_text: JsonText = None, file: JsonFile = None) -> None:
    """Create a logical device from a JSON object and print it (its uid included).

    Example: isthmus ld create --json '{"name": "tank 7 level"}'
    """
    body = read_json_object(ctx, json_text, file)
    with session(ctx).client() as api:
        print_json(api.post("/mgmt/logical", body))


@ld_app.command("up")
def ld_up(ctx: typer.Context, luid: LUid, json_text: JsonText = None, file: JsonFile = None) -> None:
    """Update the logical device LUID with the fields of a JSON object; print the result.

    Only the fields present in the object change.
    """
    body = read_json_object(ctx, json_text, file)
    with session(ctx).client() as api:
        print_json(api.patch(f"/mgmt/logical/{luid}", body))


@ld_app.command("rm")
def ld_rm(ctx: typer.Context, luid: LUid) -> None:
    """Delete the logical device LUID and print it as it was."""
    with session(ctx).client() as api:
        print_json(api.delete(f"/mgmt/logical/{luid}"))


# --- helpers ----------------------------------------------------------------------------------


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def _read_password(ctx: typer.Context) -> str:
    """A password from a hidden, confirmed prompt on a terminal, else the first line of stdin."""
    if _stdin_is_terminal():
        return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))
    password = typer.get_text_stream("stdin").readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise CliUsageError("no password: give --password, or one line on standard input", ctx)
    return password


def _as_list(data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, list):
        return []
    return [d for d in data if isinstance(d, dict)]


def _names(data: Any) -> dict[int, str]:
    return {d["uid"]: str(d.get("name", "")) for d in _as_list(data) if isinstance(d.get("uid"), int)}


def _current_mapping(api: ApiClient, **device: int) -> dict[str, Any] | None:
    answer = api.get("/mgmt/mappings", device)
    current = answer.get("current") if isinstance(answer, dict) else None
    return current if isinstance(current, dict) else None


def _mapped(
    mappings: dict[int, dict[str, Any] | None],
    device: dict[str, Any],
    arrow: str,
    key: str,
    names: dict[int, str],
) -> str:
    """``-> 3 tank level`` for the device's current mapping (``key`` names the other end), or ``""``."""
    uid = device.get("uid")
    mapping = mappings.get(uid) if isinstance(uid, int) else None
    if mapping is None:
        return ""
    other = mapping.get(key)
    name = names.get(other, "?") if isinstance(other, int) else "?"
    text = f"{arrow} {other} {name}"
    return text + " (paused)" if mapping.get("paused") else text

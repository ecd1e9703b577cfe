"""Argument handling and error reporting: no server needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.core import TyperGroup

from isthmus import __version__
from isthmus.cli.main import app, report


def _all_command_paths() -> list[list[str]]:
    paths: list[list[str]] = [[]]

    def walk(group: TyperGroup, prefix: list[str]) -> None:
        for name, command in group.commands.items():
            paths.append([*prefix, name])
            if isinstance(command, TyperGroup):
                walk(command, [*prefix, name])

    root = typer.main.get_command(app)
    assert isinstance(root, TyperGroup)
    walk(root, [])
    return paths


def test_the_command_tree_has_every_broker_cli_command() -> None:
    names = {" ".join(p) for p in _all_command_paths()}
    expected = {
        "serve", "config check",
        "pd get", "pd ls", "pd lum", "pd create", "pd up", "pd rm", "pd credentials",
        "ld get", "ld ls", "ld create", "ld up", "ld rm",
        "map start", "map end", "map ls", "map pause", "map resume",
        "users add", "users rm", "users token", "users chng", "users ls",
        "ts", "messages", "dlq ls", "dlq show", "sinks",
    }  # fmt: skip
    assert expected <= names


@pytest.mark.parametrize("path", _all_command_paths(), ids=lambda p: " ".join(p) or "isthmus")
def test_every_command_has_help(bare_cli, path: list[str]) -> None:
    result = bare_cli(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout
    root = typer.main.get_command(app)
    command = root
    for name in path:
        assert isinstance(command, TyperGroup)
        command = command.commands[name]
    assert command.help, f"{' '.join(path)} has no help text"


def test_version(bare_cli) -> None:
    result = bare_cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"isthmus {__version__}"


def test_missing_required_option_is_a_usage_error(bare_cli, error_line) -> None:
    result = bare_cli("pd", "get")
    assert result.exit_code == 2
    assert error_line(result) == "error: Missing option '--puid'. (see 'isthmus pd get --help')"


def test_unknown_command_is_a_usage_error(bare_cli, error_line) -> None:
    result = bare_cli("pd", "frobnicate")
    assert result.exit_code == 2
    assert "frobnicate" in error_line(result)


def test_group_without_command_is_a_usage_error(bare_cli, error_line) -> None:
    result = bare_cli("map")
    assert result.exit_code == 2
    assert error_line(result).startswith("error: Missing command.")


def test_bad_integer_is_a_usage_error(bare_cli, error_line) -> None:
    result = bare_cli("pd", "get", "--puid", "seven")
    assert result.exit_code == 2
    assert error_line(result).startswith("error: Invalid value for '--puid'")


def test_json_and_file_are_mutually_exclusive(cli, fake, error_line, tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text("{}")
    result = cli("pd", "create", "--json", "{}", "--file", "d.json")
    assert result.exit_code == 2
    assert error_line(result) == (
        "error: --json and --file cannot be combined: give exactly one of them (see 'isthmus pd create --help')"
    )
    assert fake.requests == []


def test_json_or_file_is_required(cli, fake, error_line) -> None:
    result = cli("ld", "up", "--luid", "3")
    assert result.exit_code == 2
    assert "one of (--json TEXT | --file PATH) is required" in error_line(result)
    assert fake.requests == []


def test_file_dash_reads_stdin(cli, fake) -> None:
    device = {"uid": 1, "name": "tank-7", "source_name": "http", "token": "abc"}
    fake.on("POST", "/mgmt/physical", device, status=201)
    result = cli("pd", "create", "--file", "-", input='{"name": "tank-7", "source_name": "http"}\n')
    assert result.exit_code == 0, result.output
    assert fake.body() == {"name": "tank-7", "source_name": "http"}
    assert json.loads(result.stdout) == device


def test_file_reads_a_file(cli, fake, tmp_path: Path) -> None:
    (tmp_path / "up.json").write_text('{"name": "XYZ", "last_seen": "2022-05-06T10:30+10:00"}')
    fake.on("PATCH", "/mgmt/physical/123", {"uid": 123, "name": "XYZ"})
    result = cli("pd", "up", "--puid", "123", "--file", "up.json")
    assert result.exit_code == 0, result.output
    assert fake.last.method == "PATCH"
    assert fake.body() == {"name": "XYZ", "last_seen": "2022-05-06T10:30+10:00"}


def test_missing_file(cli, fake, error_line) -> None:
    result = cli("ld", "create", "--file", "nope.json")
    assert result.exit_code == 1
    assert error_line(result) == "error: cannot read --file nope.json: no such file"
    assert fake.requests == []


def test_invalid_json_names_the_position(cli, fake, error_line) -> None:
    result = cli("pd", "create", "--json", '{"name": "x" "source_name": "http"}')
    assert result.exit_code == 1
    assert error_line(result) == (
        "error: invalid JSON in --json: Expecting ',' delimiter at line 1, column 14 (character 13)"
    )
    assert fake.requests == []


def test_invalid_json_from_stdin(cli, error_line) -> None:
    result = cli("pd", "create", "--file", "-", input='{\n  "name": tank\n}')
    assert result.exit_code == 1
    assert error_line(result) == (
        "error: invalid JSON in standard input: Expecting value at line 2, column 11 (character 12)"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "error: --json must hold a JSON object ({...}), not an array"),
        ('"x"', "error: --json must hold a JSON object ({...}), not a string"),
        ("   ", "error: --json is empty: expected a JSON object"),
        ('{"a": NaN}', "error: invalid JSON in --json: NaN is not a JSON value"),
    ],
)
def test_json_must_be_an_object(cli, error_line, text: str, message: str) -> None:
    result = cli("ld", "create", "--json", text)
    assert result.exit_code == 1
    assert error_line(result) == message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["map", "end"], "one of (--puid | --luid) is required"),
        (["map", "end", "--puid", "1", "--luid", "2"], "--puid and --luid cannot be combined"),
        (["map", "ls"], "one of (--puid | --luid) is required"),
        (["messages"], "one of (--puid | --luid | --unmapped) is required"),
        (["messages", "--luid", "1", "--unmapped"], "--luid and --unmapped cannot be combined"),
        (["users", "token", "-u", "bob"], "one of (--refresh | --disable | --enable) is required"),
        (["users", "token", "-u", "bob", "--refresh", "--disable"], "--refresh and --disable cannot be combined"),
        (["ts", "--luid", "1", "--since", "yesterday"], "--since 'yesterday' is not an ISO-8601 timestamp"),
    ],
)
def test_exactly_one_of(cli, fake, error_line, args: list[str], message: str) -> None:
    result = cli(*args)
    assert result.exit_code == 2
    assert message in error_line(result)
    assert fake.requests == []


def test_server_not_running(bare_cli, error_line, free_port: int) -> None:
    result = bare_cli("--url", f"http://127.0.0.1:{free_port}", "--token", "t", "pd", "ls")
    assert result.exit_code == 1
    assert error_line(result) == (
        f"error: cannot reach Isthmus at http://127.0.0.1:{free_port} (connection refused)"
        " — is 'isthmus serve' running?"
    )


def test_server_not_running_url_from_config(bare_cli, error_line, free_port: int, tmp_path: Path) -> None:
    config = tmp_path / "isthmus.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[http]\nhost = "0.0.0.0"\nport = {free_port}\n')
    result = bare_cli("--config", str(config), "--token", "t", "ld", "ls")
    assert result.exit_code == 1
    assert f"cannot reach Isthmus at http://127.0.0.1:{free_port} (connection refused)" in error_line(result)


def test_missing_token_file_says_where_it_looked(bare_cli, error_line, tmp_path: Path) -> None:
    config = tmp_path / "isthmus.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    result = bare_cli("--config", str(config), "pd", "ls")
    assert result.exit_code == 1
    line = error_line(result)
    assert line.startswith(f"error: no admin token: {tmp_path / 'data' / 'admin.token'} does not exist")
    assert "--token" in line


def test_missing_token_file_with_default_config(bare_cli, error_line, tmp_path: Path) -> None:
    result = bare_cli("users", "ls")
    assert result.exit_code == 1
    assert f"{tmp_path / 'isthmus-data' / 'admin.token'} does not exist" in error_line(result)


def test_empty_token_file(bare_cli, error_line, tmp_path: Path) -> None:
    (tmp_path / "isthmus-data").mkdir()
    (tmp_path / "isthmus-data" / "admin.token").write_text("\n")
    result = bare_cli("users", "ls")
    assert result.exit_code == 1
    assert error_line(result) == f"error: the admin token from {tmp_path / 'isthmus-data' / 'admin.token'} is empty"


def test_invalid_configuration_is_one_line(bare_cli, error_line, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[http]\nport = 99999\nbogus = 1\n")
    result = bare_cli("--config", str(config), "pd", "ls")
    assert result.exit_code == 1
    line = error_line(result)
    assert line.startswith("error: invalid configuration: ")
    assert "http.port" in line


def test_missing_configuration_file(bare_cli, error_line, tmp_path: Path) -> None:
    result = bare_cli("--config", "missing.toml", "config", "check")
    assert result.exit_code == 1
    assert "missing.toml" in error_line(result)


def test_bad_url(bare_cli, error_line) -> None:
    result = bare_cli("--url", "localhost:8080", "--token", "t", "sinks")
    assert result.exit_code == 1
    assert error_line(result) == "error: --url must be an http:// or https:// URL, got 'localhost:8080'"


def test_internal_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        {}["uid"]
    except KeyError as exc:
        code = report(exc)
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: internal error: KeyError: 'uid' at test_arguments.py:")


def test_python_dash_m_without_server(free_port: int) -> None:
    """The real entry point, as a user would run it: one line on stderr, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "isthmus", "--url", f"http://127.0.0.1:{free_port}", "--token", "t", "pd", "lum"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"error: cannot reach Isthmus at http://127.0.0.1:{free_port} (connection refused)"
        " — is 'isthmus serve' running?\n"
    )


def test_import_does_no_work() -> None:
    """Importing the CLI reads no configuration and does not import the server."""
    code = (
        "import sys, isthmus.cli.main, isthmus.cli.docs; "
        "bad = [m for m in ('isthmus.config', 'isthmus.runtime.supervisor') if m in sys.modules]; "
        "print(bad)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"

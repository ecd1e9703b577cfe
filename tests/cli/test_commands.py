"""What each command asks the management API, and how it prints the answer (fake API, no server)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from isthmus.cli.main import app

PD1 = {
    "uid": 1,
    "name": "tank-7",
    "source_name": "http",
    "source_ids": {},
    "location": None,
    "last_seen": None,
    "properties": {"fw": "1.2"},
    "token": "dev-token",
    "enabled": True,
    "decoder": None,
    "created_at": "2024-05-06T10:30:00Z",
}
PD2 = {**PD1, "uid": 2, "name": "tank-8", "properties": {}}
LD1 = {"uid": 5, "name": "tank 7 level", "location": None, "last_seen": None, "created_at": "2024-05-06T10:31:00Z"}
MAPPING = {"id": 9, "p_uid": 1, "l_uid": 5, "start_time": "2024-05-06T10:32:00Z", "end_time": None, "paused": False}


def test_requests_carry_the_bearer_token(cli, fake) -> None:
    fake.on("GET", "/mgmt/physical/1", PD1)
    assert cli("pd", "get", "--puid", "1").exit_code == 0
    assert fake.last.headers["authorization"] == "Bearer admin-token-123"
    assert str(fake.last.url).startswith("http://isthmus.test:8080/mgmt/physical/1")


def test_pd_get_leaves_out_properties(cli, fake) -> None:
    fake.on("GET", "/mgmt/physical/1", PD1)
    result = cli("pd", "get", "--puid", "1")
    assert result.exit_code == 0, result.output
    assert fake.params() == {"properties": "false"}
    printed = json.loads(result.stdout)
    assert "properties" not in printed
    assert printed["name"] == "tank-7"
    assert result.stdout.startswith("{\n  ")  # pretty JSON, like broker-cli


def test_pd_get_with_properties(cli, fake) -> None:
    fake.on("GET", "/mgmt/physical/1", PD1)
    result = cli("pd", "get", "--puid", "1", "--properties")
    assert fake.params() == {"properties": "true"}
    assert json.loads(result.stdout)["properties"] == {"fw": "1.2"}


def test_not_found_is_the_servers_sentence(cli, fake, error_line) -> None:
    fake.error("GET", "/mgmt/physical/7", 404, "not_found", "physical device 7 not found")
    result = cli("pd", "get", "--puid", "7")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert error_line(result) == "error: physical device 7 not found"


def test_bad_token(cli, fake, error_line) -> None:
    fake.error("GET", "/mgmt/logical", 401, "unauthorized", "unknown or revoked token")
    result = cli("ld", "ls")
    assert result.exit_code == 1
    assert error_line(result) == (
        "error: Isthmus rejected the token from --token (401 unauthorized: unknown or revoked token)"
    )


def test_bad_token_from_the_environment(fake, error_line) -> None:
    fake.error("GET", "/mgmt/users", 401, "unauthorized", "unknown or revoked token")
    env = {"ISTHMUS_URL": "http://isthmus.test", "ISTHMUS_TOKEN": "nope"}
    result = CliRunner().invoke(app, ["users", "ls"], obj=fake.transport, env=env)
    assert result.exit_code == 1
    assert "rejected the token from ISTHMUS_TOKEN" in error_line(result)
    assert fake.last.headers["authorization"] == "Bearer nope"


def test_read_only_user_is_forbidden(cli, fake, error_line) -> None:
    fake.error("POST", "/mgmt/logical", 403, "forbidden", "read-only users cannot change anything")
    result = cli("ld", "create", "--json", '{"name": "x"}')
    assert result.exit_code == 1
    assert error_line(result) == "error: read-only users cannot change anything"


def test_server_error(cli, fake, error_line) -> None:
    fake.error("GET", "/mgmt/sinks", 500, "internal", "the journal is closed")
    result = cli("sinks")
    assert result.exit_code == 1
    assert error_line(result) == "error: server error (HTTP 500): the journal is closed"


def test_an_answer_that_is_not_json(cli, fake, error_line) -> None:
    fake.on_call("GET", "/mgmt/sinks", lambda _r: httpx.Response(200, text="<html>hi</html>"))
    result = cli("sinks")
    assert result.exit_code == 1
    assert "answered HTTP 200 with a body that is not JSON" in error_line(result)


def test_an_error_without_the_error_shape(cli, fake, error_line) -> None:
    fake.on_call("GET", "/mgmt/users", lambda _r: httpx.Response(502, text="Bad Gateway"))
    result = cli("users", "ls")
    assert result.exit_code == 1
    assert error_line(result) == "error: GET /mgmt/users failed: HTTP 502 Bad Gateway"


def test_pd_ls_json(cli, fake) -> None:
    fake.on("GET", "/mgmt/physical", [PD1, PD2])
    result = cli("pd", "ls", "--source", "http")
    assert result.exit_code == 0, result.output
    assert fake.params() == {"source": "http", "properties": "false"}
    assert [d["uid"] for d in json.loads(result.stdout)] == [1, 2]
    assert all("properties" not in d for d in json.loads(result.stdout))


def test_pd_ls_plain_shows_the_current_mapping(cli, fake) -> None:
    fake.on("GET", "/mgmt/physical", [PD1, PD2])
    fake.on("GET", "/mgmt/logical", [LD1])

    def mappings(request: httpx.Request) -> httpx.Response:
        current = MAPPING if request.url.params["p_uid"] == "1" else None
        return httpx.Response(200, json={"current": current, "history": []})

    fake.on_call("GET", "/mgmt/mappings", mappings)
    result = cli("pd", "ls", "--plain")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"   1 {'tank-7':<40} http     -> 5 tank 7 level",
        f"   2 {'tank-8':<40} http",
    ]


def test_pd_lum(cli, fake) -> None:
    fake.on("GET", "/mgmt/physical", [PD2])
    result = cli("pd", "lum", "--plain", "--source", "http")
    assert result.exit_code == 0, result.output
    assert fake.params() == {"source": "http", "unmapped": "true", "properties": "false"}
    assert result.stdout == f"   2 {'tank-8':<40} http\n"
    assert len(fake.requests) == 1  # unmapped: no mapping look-ups


def test_pd_rm_prints_the_deleted_device(cli, fake) -> None:
    fake.on("DELETE", "/mgmt/physical/2", PD2)
    result = cli("pd", "rm", "--puid", "2")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["uid"] == 2


def test_ld_ls_plain_shows_the_physical_device(cli, fake) -> None:
    fake.on("GET", "/mgmt/logical", [LD1])
    fake.on("GET", "/mgmt/physical", [PD1])
    fake.on("GET", "/mgmt/mappings", {"current": {**MAPPING, "paused": True}, "history": []})
    result = cli("ld", "ls", "--plain")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"   5 {'tank 7 level':<40} <- 1 tank-7 (paused)\n"
    assert {"l_uid": "5"} in [dict(r.url.params) for r in fake.requests]


def test_ld_create_and_up(cli, fake, tmp_path: Path) -> None:
    fake.on("POST", "/mgmt/logical", LD1, status=201)
    fake.on("PATCH", "/mgmt/logical/5", {**LD1, "name": "renamed"})
    created = cli("ld", "create", "--json", '{"name": "tank 7 level"}')
    assert created.exit_code == 0, created.output
    assert json.loads(created.stdout)["uid"] == 5
    updated = cli("ld", "up", "--luid", "5", "--file", "-", input='{"name": "renamed"}')
    assert updated.exit_code == 0, updated.output
    assert fake.body() == {"name": "renamed"}
    assert json.loads(updated.stdout)["name"] == "renamed"


def test_ld_rm(cli, fake) -> None:
    fake.on("DELETE", "/mgmt/logical/5", LD1)
    assert cli("ld", "rm", "--luid", "5").exit_code == 0
    assert fake.last.method == "DELETE"


@pytest.mark.parametrize(
    ("args", "path", "body"),
    [
        (["map", "start", "--puid", "1", "--luid", "5"], "/mgmt/mappings", {"p_uid": 1, "l_uid": 5}),
        (["map", "end", "--puid", "1"], "/mgmt/mappings/end", {"p_uid": 1}),
        (["map", "end", "--luid", "5"], "/mgmt/mappings/end", {"l_uid": 5}),
        (["map", "pause", "--puid", "1"], "/mgmt/mappings/pause", {"p_uid": 1}),
        (["map", "resume", "--puid", "1"], "/mgmt/mappings/resume", {"p_uid": 1}),
    ],
)
def test_map_commands(cli, fake, args: list[str], path: str, body: dict[str, int]) -> None:
    fake.on("POST", path, MAPPING)
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert fake.body() == body
    assert json.loads(result.stdout) == MAPPING


def test_map_ls(cli, fake) -> None:
    answer = {"current": MAPPING, "history": [{**MAPPING, "id": 3, "end_time": "2024-05-01T00:00:00Z"}]}
    fake.on("GET", "/mgmt/mappings", answer)
    result = cli("map", "ls", "--luid", "5")
    assert result.exit_code == 0, result.output
    assert fake.params() == {"l_uid": "5"}
    assert json.loads(result.stdout) == answer


def test_map_start_conflict(cli, fake, error_line) -> None:
    fake.error("POST", "/mgmt/mappings", 404, "not_found", "logical device 99 not found")
    result = cli("map", "start", "--puid", "1", "--luid", "99")
    assert result.exit_code == 1
    assert error_line(result) == "error: logical device 99 not found"


def test_users_add_prints_the_token(cli, fake) -> None:
    user = {"username": "alice", "read_only": True, "enabled": False, "created_at": "2024-05-06T10:30:00Z"}
    fake.on("POST", "/mgmt/users", {"user": user, "token": "tok-alice"}, status=201)
    result = cli("users", "add", "-u", "alice", "-p", "s3cret", "--read-only", "-d")
    assert result.exit_code == 0, result.output
    assert fake.body() == {"username": "alice", "password": "s3cret", "read_only": True, "enabled": False}
    assert result.stdout == "tok-alice\n"


def test_users_add_prompts_for_the_password(cli, fake) -> None:
    fake.on("POST", "/mgmt/users", {"user": {"username": "bob"}, "token": "tok-bob"}, status=201)
    result = cli("users", "add", "-u", "bob", input="pw\npw\n")
    assert result.exit_code == 0, result.output
    assert fake.body()["password"] == "pw"
    assert result.stdout.endswith("tok-bob\n")


def test_users_rm_and_chng(cli, fake) -> None:
    fake.on("DELETE", "/mgmt/users/a%2Fb", None)
    fake.on_call("PUT", "/mgmt/users/alice/password", lambda _r: httpx.Response(204))
    removed = cli("users", "rm", "-u", "a/b")
    assert removed.exit_code == 0, removed.output
    assert fake.last.url.raw_path == b"/mgmt/users/a%2Fb"
    assert removed.stdout == "user 'a/b' removed\n"
    changed = cli("users", "chng", "-u", "alice", "-p", "new")
    assert changed.exit_code == 0, changed.output
    assert fake.body() == {"password": "new"}


@pytest.mark.parametrize(
    ("flag", "answer", "printed"),
    [
        ("--refresh", "tok-new", "tok-new\n"),
        ("--disable", None, "token of user 'alice' disabled\n"),
        ("--enable", "tok-old", "tok-old\n"),
    ],
)
def test_users_token(cli, fake, flag: str, answer: str | None, printed: str) -> None:
    fake.on("POST", "/mgmt/users/alice/token", {"token": answer})
    result = cli("users", "token", "-u", "alice", flag)
    assert result.exit_code == 0, result.output
    assert fake.body() == {"action": flag.removeprefix("--")}
    assert result.stdout == printed


def test_users_ls_table_and_json(cli, fake) -> None:
    users = [{"username": "alice", "read_only": True, "enabled": True, "created_at": "2024-05-06T10:30:00Z"}]
    fake.on("GET", "/mgmt/users", users)
    table = cli("users", "ls")
    assert table.exit_code == 0, table.output
    assert "username" in table.stdout
    row = next(line for line in table.stdout.splitlines() if "alice" in line)
    assert "yes" in row
    as_json = cli("users", "ls", "--json")
    assert json.loads(as_json.stdout) == users


POINTS = [
    {
        "l_uid": 5,
        "name": "level",
        "timestamp": "2024-05-06T10:30:00Z",
        "value": 1.5,
        "correlation_id": "0190a5c2-7d1e-7000-8000-000000000001",
    },
    {
        "l_uid": 5,
        "name": "state",
        "timestamp": "2024-05-06T10:31:00Z",
        "value": "open",
        "correlation_id": "0190a5c2-7d1e-7000-8000-000000000002",
    },
]


def test_ts_table(cli, fake) -> None:
    fake.on("GET", "/mgmt/timeseries", POINTS)
    result = cli("ts", "--luid", "5", "--name", "level", "--since", "2024-05-06T00:00:00Z", "--limit", "10")
    assert result.exit_code == 0, result.output
    assert fake.params() == {"l_uid": "5", "name": "level", "since": "2024-05-06T00:00:00Z", "limit": "10"}
    for point in POINTS:
        assert point["correlation_id"] in result.stdout
    assert "1.5" in result.stdout
    assert "open" in result.stdout


def test_ts_json(cli, fake) -> None:
    fake.on("GET", "/mgmt/timeseries", POINTS)
    result = cli("ts", "--luid", "5", "--json")
    assert json.loads(result.stdout) == POINTS


def test_ts_empty(cli, fake) -> None:
    fake.on("GET", "/mgmt/timeseries", [])
    result = cli("ts", "--luid", "5")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert result.stderr == "no points\n"


MESSAGES = [
    {
        "seq": 12,
        "correlation_id": "0190a5c2-7d1e-7000-8000-00000000000c",
        "received_at": "2024-05-06T10:30:00Z",
        "source": "http",
        "p_uid": 1,
        "l_uid": None,
        "kind": "telemetry",
        "status": "decode_error",
        "error": "payload is not a JSON object",
        "content_type": "application/json",
        "payload": "[1,2]",
        "payload_encoding": "utf-8",
        "message": None,
    },
    {
        "seq": 11,
        "correlation_id": "0190a5c2-7d1e-7000-8000-00000000000b",
        "received_at": "2024-05-06T10:29:00Z",
        "source": "mqtt",
        "p_uid": 1,
        "l_uid": 5,
        "kind": "telemetry",
        "status": "ok",
        "error": None,
        "content_type": "application/octet-stream",
        "payload": base64.b64encode(b"\x01\x02\x03").decode(),
        "payload_encoding": "base64",
        "message": {"p_uid": 1},
    },
]


def test_messages_table(cli, fake) -> None:
    fake.on("GET", "/mgmt/messages", MESSAGES)
    result = cli("messages", "--puid", "1", "--status", "ok", "--until", "2024-05-07")
    assert result.exit_code == 0, result.output
    assert fake.params() == {"p_uid": "1", "status": "ok", "until": "2024-05-07"}
    out = result.stdout
    assert "0190a5c2-7d1e-7000-8000-00000000000c" in out
    assert "payload is not a JSON object" in out
    assert "<3 bytes, base64>" in out


def test_messages_unmapped_json(cli, fake) -> None:
    fake.on("GET", "/mgmt/messages", MESSAGES[:1])
    result = cli("messages", "--unmapped", "--json")
    assert result.exit_code == 0, result.output
    assert fake.params() == {"unmapped": "true"}
    assert json.loads(result.stdout) == MESSAGES[:1]


SINKS = [
    {
        "name": "timeseries",
        "type": "sql",
        "state": "healthy",
        "last_error": None,
        "cursor": 42,
        "lag": 0,
        "delivered": 40,
        "dead_lettered": 1,
        "skipped": 1,
    },
    {
        "name": "hook",
        "type": "webhook",
        "state": "retrying",
        "last_error": "connection refused",
        "cursor": 30,
        "lag": 12,
        "delivered": 29,
        "dead_lettered": 0,
        "skipped": 0,
    },
]


def test_sinks_table(cli, fake) -> None:
    fake.on("GET", "/mgmt/sinks", SINKS)
    result = cli("sinks")
    assert result.exit_code == 0, result.output
    hook = next(line for line in result.stdout.splitlines() if "hook" in line)
    assert "retrying" in hook
    assert "connection refused" in hook
    assert json.loads(cli("sinks", "--json").stdout) == SINKS


DEAD = {
    "id": 3,
    "sink": "hook",
    "seq": 17,
    "correlation_id": "0190a5c2-7d1e-7000-8000-000000000011",
    "stage": "write",
    "reason": "HTTP 400 from the webhook",
    "attempts": 1,
    "created_at": "2024-05-06T10:30:00Z",
    "payload": "{}",
    "payload_encoding": "utf-8",
    "message": None,
}


def test_dlq_ls_and_show(cli, fake) -> None:
    fake.on("GET", "/mgmt/dead-letters", [DEAD])
    fake.on("GET", "/mgmt/dead-letters/3", DEAD)
    listed = cli("dlq", "ls", "--sink", "hook", "--after-id", "2", "--limit", "5")
    assert listed.exit_code == 0, listed.output
    assert fake.params() == {"sink": "hook", "after_id": "2", "limit": "5"}
    assert "HTTP 400 from the webhook" in listed.stdout
    shown = cli("dlq", "show", "3")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout) == DEAD


def test_dlq_ls_empty(cli, fake) -> None:
    fake.on("GET", "/mgmt/dead-letters", [])
    result = cli("dlq", "ls")
    assert result.exit_code == 0
    assert result.stderr == "no dead letters\n"
    assert json.loads(cli("dlq", "ls", "--json").stdout) == []


def test_dlq_redrive_sends_the_sink_and_ids(cli, fake) -> None:
    fake.on("POST", "/mgmt/dead-letters/redrive", {"redriven": 2, "failed": 0, "reason": None})
    result = cli("dlq", "redrive", "--sink", "hook", "--id", "3", "--id", "4")
    assert result.exit_code == 0, result.output
    assert json.loads(fake.requests[-1].content) == {"sink": "hook", "limit": 1000, "ids": [3, 4]}
    assert json.loads(result.stdout)["redriven"] == 2
    everything = cli("dlq", "redrive", "--sink", "hook")
    assert everything.exit_code == 0
    assert json.loads(fake.requests[-1].content) == {"sink": "hook", "limit": 1000}


def test_url_and_token_come_from_the_configuration(fake, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "admin.token").write_text("file-token\n")
    config = tmp_path / "isthmus.toml"
    config.write_text(f'data_dir = "{data}"\n[http]\nhost = "0.0.0.0"\nport = 8123\n')
    fake.on("GET", "/mgmt/sinks", [])
    result = CliRunner().invoke(app, ["--config", str(config), "sinks"], obj=fake.transport)
    assert result.exit_code == 0, result.output
    assert str(fake.last.url) == "http://127.0.0.1:8123/mgmt/sinks"
    assert fake.last.headers["authorization"] == "Bearer file-token"


def test_configuration_from_the_environment(fake, tmp_path: Path) -> None:
    (tmp_path / "isthmus-data").mkdir()
    (tmp_path / "isthmus-data" / "admin.token").write_text("t")
    fake.on("GET", "/mgmt/sinks", [])
    env = {"ISTHMUS_HTTP__HOST": "::1", "ISTHMUS_HTTP__PORT": "9000"}
    result = CliRunner().invoke(app, ["sinks"], obj=fake.transport, env=env)
    assert result.exit_code == 0, result.output
    assert str(fake.last.url) == "http://[::1]:9000/mgmt/sinks"


def test_url_with_a_path_prefix(fake) -> None:
    fake.on("GET", "/isthmus/mgmt/sinks", [])
    result = CliRunner().invoke(
        app, ["--url", "https://proxy.test/isthmus/", "--token", "t", "sinks"], obj=fake.transport
    )
    assert result.exit_code == 0, result.output
    assert str(fake.last.url) == "https://proxy.test/isthmus/mgmt/sinks"


def test_config_check_prints_effective_values(bare_cli, tmp_path: Path) -> None:
    config = tmp_path / "isthmus.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        'registry_url = "postgresql://isthmus:hunter2@db/isthmus"\n'
        "[http]\nport = 8181\n"
        '[[sinks]]\nname = "hook"\ntype = "webhook"\noptions = { url = "https://x.test", password = "pw" }\n'
    )
    result = bare_cli("config", "check", "--config", str(config))
    assert result.exit_code == 0, result.output
    effective = json.loads(result.stdout)
    assert effective["http"] == {"host": "0.0.0.0", "port": 8181, "max_payload": 65536}  # noqa: S104 - the default, read back
    assert effective["data_dir"] == str(tmp_path / "data")
    assert effective["registry_url"] == "postgresql://isthmus:***@db/isthmus"
    assert effective["sinks"][0]["options"] == {"url": "https://x.test", "password": "***"}
    assert "hunter2" not in result.output
    assert result.stderr.startswith("configuration is valid")


def test_config_check_invalid(bare_cli, error_line, tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[http]\nprot = 1\n")
    result = bare_cli("--config", "c.toml", "config", "check")
    assert result.exit_code == 1
    assert error_line(result) == "error: invalid configuration: c.toml: http.prot: unknown key"


# --- pd credentials ---------------------------------------------------------------------------

PD1_WITH_USER = {**PD1, "username": "tank-7"}


def test_pd_credentials_sets_username_and_password(cli, fake) -> None:
    fake.on("PUT", "/mgmt/physical/1/credentials", PD1_WITH_USER)
    result = cli("pd", "credentials", "--puid", "1", "--username", "tank-7", "--password", "s3cret")
    assert result.exit_code == 0, result.output
    assert fake.last.method == "PUT"
    assert fake.body() == {"username": "tank-7", "password": "s3cret"}
    printed = json.loads(result.stdout)
    assert printed["username"] == "tank-7" and "properties" not in printed
    assert "s3cret" not in result.output


def test_pd_credentials_reads_the_password_from_stdin_without_echo(cli, fake) -> None:
    fake.on("PUT", "/mgmt/physical/1/credentials", PD1_WITH_USER)
    result = cli("pd", "credentials", "--puid", "1", "-u", "tank-7", input="pipe d secret\r\nsecond line\n")
    assert result.exit_code == 0, result.output
    assert fake.body() == {"username": "tank-7", "password": "pipe d secret"}
    assert "secret" not in result.output


def test_pd_credentials_prompts_hidden_on_a_terminal(cli, fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("isthmus.cli.devices._stdin_is_terminal", lambda: True)
    fake.on("PUT", "/mgmt/physical/1/credentials", PD1_WITH_USER)
    result = cli("pd", "credentials", "--puid", "1", "-u", "tank-7", input="typed pw\ntyped pw\n")
    assert result.exit_code == 0, result.output
    assert fake.body()["password"] == "typed pw"
    assert "Password:" in result.output and "Repeat for confirmation:" in result.output
    assert "typed pw" not in result.output  # hidden input


def test_pd_credentials_prompt_mismatch_asks_again(cli, fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("isthmus.cli.devices._stdin_is_terminal", lambda: True)
    fake.on("PUT", "/mgmt/physical/1/credentials", PD1_WITH_USER)
    result = cli("pd", "credentials", "--puid", "1", "-u", "u", input="one\ntwo\nthree\nthree\n")
    assert result.exit_code == 0, result.output
    assert fake.body()["password"] == "three"


def test_pd_credentials_without_a_password_on_stdin(cli, fake, error_line) -> None:
    result = cli("pd", "credentials", "--puid", "1", "-u", "tank-7", input="")
    assert result.exit_code == 2
    assert error_line(result).startswith("error: no password: give --password, or one line on standard input")
    assert fake.requests == []


def test_pd_credentials_remove(cli, fake) -> None:
    fake.on("DELETE", "/mgmt/physical/1/credentials", {**PD1, "username": None})
    result = cli("pd", "credentials", "--puid", "1", "--remove")
    assert result.exit_code == 0, result.output
    assert fake.last.method == "DELETE"
    assert json.loads(result.stdout)["username"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "one of (--username | --remove) is required"),
        (["-u", "x", "--remove"], "--username and --remove cannot be combined"),
        (["--remove", "-p", "pw"], "--password cannot be combined with --remove"),
    ],
)
def test_pd_credentials_usage_errors(cli, fake, error_line, args: list[str], message: str) -> None:
    result = cli("pd", "credentials", "--puid", "1", *args, input="pw\n")
    assert result.exit_code == 2
    assert message in error_line(result)
    assert fake.requests == []


def test_pd_credentials_conflict_is_the_servers_sentence(cli, fake, error_line) -> None:
    message = "username 'tank-7' already in use by another device"
    fake.error("PUT", "/mgmt/physical/2/credentials", 409, "conflict", message)
    result = cli("pd", "credentials", "--puid", "2", "-u", "tank-7", "-p", "pw")
    assert result.exit_code == 1
    assert error_line(result) == f"error: {message}"


def test_pd_state_prints_the_online_state(cli, fake) -> None:
    state = {"online": True, "since": "2026-01-01T00:00:00Z", "links": 1, "last_seen": "2026-01-01T00:00:01Z"}
    fake.on("GET", "/mgmt/physical/1/state", state)
    result = cli("pd", "state", "--puid", "1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == state


def test_pd_attrs_sets_shared_attributes_then_prints_both_scopes(cli, fake) -> None:
    fake.on("PUT", "/mgmt/physical/1/attributes", {"interval": 60})
    fake.on("GET", "/mgmt/physical/1/attributes", {"client": {"fw": "1"}, "shared": {"interval": 60}})
    result = cli("pd", "attrs", "--puid", "1", "--json", '{"interval": 60}')
    assert result.exit_code == 0, result.output
    assert fake.body(0) == {"interval": 60}
    assert json.loads(result.stdout)["shared"] == {"interval": 60}
    result = cli("pd", "attrs", "--puid", "1")
    assert [r.method for r in fake.requests] == ["PUT", "GET", "GET"]


def test_pd_rpc_sends_the_call_and_prints_the_answer(cli, fake) -> None:
    fake.on("POST", "/mgmt/physical/1/rpc", {"response": {"ok": True}})
    result = cli("pd", "rpc", "--puid", "1", "--method", "setValve", "--params", '{"open": 1}', "--timeout", "30")
    assert result.exit_code == 0, result.output
    assert fake.body() == {"method": "setValve", "params": {"open": 1}, "timeout": 30.0, "oneway": False}
    assert json.loads(result.stdout) == {"response": {"ok": True}}


def test_pd_rpc_bad_params_and_an_unreachable_device(cli, fake, error_line) -> None:
    result = cli("pd", "rpc", "--puid", "1", "--method", "m", "--params", "{oops")
    assert result.exit_code == 2 and "--params is not JSON" in result.output
    fake.error("POST", "/mgmt/physical/1/rpc", 409, "device_unreachable", "device 1 is not connected")
    result = cli("pd", "rpc", "--puid", "1", "--method", "m")
    assert result.exit_code != 0
    assert "device 1 is not connected" in error_line(result)

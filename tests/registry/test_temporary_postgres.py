"""isthmus.testing.postgres: the throwaway PostgreSQL cluster the registry and sink tests use.

(It lives here because the registry tests are its main user; it is a shipped helper.)
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, text

from isthmus.testing import postgres as module
from isthmus.testing.postgres import TemporaryPostgres, find_bindir, shared_postgres


def test_missing_postgresql_fails_loudly_naming_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "_DEBIAN_ROOT", tmp_path / "no-postgresql-here")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"not installed.*Debian package 'postgresql'"):
        find_bindir()
    with pytest.raises(RuntimeError, match="Debian package 'postgresql'"):
        TemporaryPostgres().start()
    with pytest.raises(RuntimeError, match=r"initdb not found \(Debian package 'postgresql'\)"):
        TemporaryPostgres(bindir=tmp_path).start()


def test_debian_layout_is_found() -> None:
    bindir = find_bindir()
    assert (bindir / "initdb").is_file()
    assert (bindir / "pg_ctl").is_file()


def test_a_cluster_of_its_own_from_start_to_stop() -> None:
    pg = TemporaryPostgres(settings={"timezone": "'Asia/Kathmandu'"})
    assert not pg.running
    with pytest.raises(RuntimeError, match="not running"):
        _ = pg.url
    with pg:
        assert pg.start() is pg  # already running: a no-op
        assert pg.url == f"postgresql+psycopg://isthmus@127.0.0.1:{pg.port}/isthmus_test"
        assert pg.dsn == f"host=127.0.0.1 port={pg.port} user=isthmus dbname=isthmus_test"
        directory, dsn = pg.directory, pg.dsn
        with psycopg.connect(pg.dsn) as conn:
            settings = dict(
                conn.execute(
                    "SELECT name, setting FROM pg_settings WHERE name IN"
                    " ('fsync', 'synchronous_commit', 'full_page_writes', 'listen_addresses', 'TimeZone',"
                    "  'unix_socket_directories', 'server_encoding')"
                ).fetchall()
            )
            assert conn.execute("SELECT current_user, current_database()").fetchone() == ("isthmus", "isthmus_test")
        assert settings == {
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "listen_addresses": "127.0.0.1",
            "TimeZone": "Asia/Kathmandu",
            "unix_socket_directories": str(directory),
            "server_encoding": "UTF8",
        }
        owner = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
        assert (directory / "data").stat().st_uid == owner  # root runs the server as 'postgres'
    assert not pg.running
    assert not directory.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2).close()
    pg.stop()  # idempotent


def test_create_database_copies_a_template_and_drop_removes_it(postgres: TemporaryPostgres) -> None:
    template_url = postgres.create_database("helper_template")
    engine = create_engine(template_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x integer)"))
            conn.execute(text("INSERT INTO t VALUES (1), (2)"))
    finally:
        engine.dispose()  # a template must have no connection while it is copied
    copy_url = postgres.create_database(template="helper_template")
    assert copy_url.startswith(f"postgresql+psycopg://isthmus@127.0.0.1:{postgres.port}/db_")
    copy = create_engine(copy_url)
    try:
        with copy.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 2
        name = copy_url.rsplit("/", 1)[1]
        postgres.drop_database(name)  # closes the pooled connection still open to it
        postgres.drop_database(name)  # missing: ignored
    finally:
        copy.dispose()
    postgres.drop_database("helper_template")
    with psycopg.connect(postgres.dsn) as conn:
        names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert not names & {"helper_template", name}


@pytest.mark.parametrize("name", ["", "Upper", "1st", "a-b", "x; DROP DATABASE y", "a" * 64])
def test_database_names_are_checked(postgres: TemporaryPostgres, name: str) -> None:
    with pytest.raises(ValueError, match="database name"):
        postgres.create_database(name)


def test_shared_postgres_is_one_cluster_per_process(postgres: TemporaryPostgres) -> None:
    with shared_postgres() as again:
        assert again is postgres
    assert postgres.running  # the session fixture still holds it

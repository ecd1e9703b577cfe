"""A throwaway PostgreSQL cluster for tests (an official test helper of Isthmus and its plugins).

:class:`TemporaryPostgres` runs ``initdb`` into a fresh temporary directory and starts a
private server on ``127.0.0.1`` (on a free TCP port, with its unix socket inside that
directory), tuned for speed over durability. Nothing is mocked: it is the real server from
Debian's ``postgresql`` package (or any ``initdb``/``pg_ctl`` on ``PATH``)::

    from isthmus.testing.postgres import TemporaryPostgres

    with TemporaryPostgres() as pg:
        engine = sqlalchemy.create_engine(pg.url)  # postgresql+psycopg://isthmus@127.0.0.1:<port>/isthmus_test
        ...
        fresh = pg.create_database()  # another empty database, ~20 ms

If PostgreSQL (13 or newer) is not installed, :meth:`TemporaryPostgres.start` raises
:class:`RuntimeError` naming the Debian package: a test suite that uses this helper fails
loudly instead of skipping (Isthmus' ``make test`` installs the package). The helper needs
psycopg 3 (``pip install 'isthmus[postgres]'``; the ``test`` extra includes it).

Run as root, ``initdb`` and ``postgres`` refuse to start; the helper then runs them as the
``postgres`` system user (created by the Debian package) through ``runuser`` and gives that
user the temporary directory. As any other user they run directly.

Isolation. :meth:`TemporaryPostgres.create_database` clones a database, optionally from a
template (``CREATE DATABASE … TEMPLATE … STRATEGY FILE_COPY``: ~20 ms to create, ~6 ms to
drop on a 2-core machine, measured). That is the chosen way to isolate tests: migrate a
template once per session, then give each test its own copy. A copy starts with the template's
sequences and catalog, so a test sees exactly what a fresh migrated database looks like, and
nothing (an open transaction, a leaked connection, a changed sequence) can leak from one test
into the next, which a ``TRUNCATE``-based reset cannot promise.

One cluster per test session. ``initdb`` costs ~1.4 s, starting the server ~0.15 s; that is
paid once per pytest process through :func:`shared_postgres`, a reference-counted context
manager: the first user starts the cluster, the last one to leave stops it. Each conftest that
needs PostgreSQL wraps it in its own session-scoped fixture, so a run of one test directory
starts the cluster only when a PostgreSQL test actually runs, and a run of several directories
shares one cluster. Cleanup is explicit (the fixtures' teardown), never ``atexit``; a process
killed with SIGKILL leaves the server running in its temporary directory, as any daemon would.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import TupleRow

__all__ = ["TemporaryPostgres", "find_bindir", "shared_postgres"]

DEBIAN_PACKAGE = "postgresql"
"""The Debian package that provides ``initdb``, ``pg_ctl`` and ``postgres``."""

USER = "isthmus"
"""The superuser of the temporary cluster (trust authentication: no password)."""

DATABASE = "isthmus_test"
"""The database created at start; :attr:`TemporaryPostgres.url` points at it."""

_SYSTEM_USER = "postgres"
_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_TIMEOUT = 60.0
_PORT_ATTEMPTS = 5
_SHM_MIN_FREE = 1 << 30
_SOCKET_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes on Linux, with ".s.PGSQL.NNNNN" added

_SETTINGS: dict[str, str] = {
    # Durability is worthless for a cluster that is deleted at the end of the run.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "shared_buffers": "16MB",
    "autovacuum": "off",
    "max_connections": "100",
    "timezone": "'UTC'",
}


def _version_key(path: Path) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in path.name.split("."))
    except ValueError:
        return (-1,)


def find_bindir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``.

    Debian's ``/usr/lib/postgresql/<highest version>/bin`` first, then ``initdb`` on ``PATH``
    (symlinks resolved, so that ``pg_ctl`` finds ``postgres`` beside it). Raises
    :class:`RuntimeError` naming the Debian package when there is none.
    """
    candidates = sorted(
        (d for d in _DEBIAN_ROOT.glob("*") if (d / "bin" / "initdb").is_file()),
        key=_version_key,
        reverse=True,
    )
    if candidates:
        return candidates[0] / "bin"
    on_path = shutil.which("initdb")
    if on_path is not None:
        bindir = Path(on_path).resolve().parent
        if (bindir / "pg_ctl").is_file():
            return bindir
    msg = (
        "PostgreSQL is not installed: no initdb under /usr/lib/postgresql/*/bin nor on PATH."
        f" Install the Debian package {DEBIAN_PACKAGE!r} ('make system-deps' as root, or"
        f" 'apt-get install {DEBIAN_PACKAGE}')."
    )
    raise RuntimeError(msg)


def _default_parent() -> Path | None:
    """``/dev/shm`` if it is usable and roomy and ``TMPDIR`` is not set; else None (the default)."""
    if os.environ.get("TMPDIR"):
        return None
    shm = Path("/dev/shm")  # noqa: S108 - a private mkdtemp() directory inside it, mode 0700
    try:
        usage = shutil.disk_usage(shm)
    except OSError:
        return None
    if usage.free >= _SHM_MIN_FREE and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        msg = f"database name {name!r} must be 1 to 63 lowercase letters, digits or '_', not starting with a digit"
        raise ValueError(msg)
    return name


class TemporaryPostgres:
    """A private PostgreSQL server in a temporary directory, deleted by :meth:`stop`.

    ``bindir`` overrides where ``initdb`` and ``pg_ctl`` are looked for (see
    :func:`find_bindir`). ``settings`` adds or overrides ``postgresql.conf`` settings, values
    written as they would be in that file (``{"timezone": "'Asia/Kathmandu'"}``); the defaults
    trade durability for speed and use the UTC time zone. Use as a context manager, or call
    :meth:`start` and :meth:`stop` (both idempotent). The server listens on ``127.0.0.1`` only,
    with trust authentication for the superuser ``isthmus``; never expose it.

    ``parent`` is where the temporary directory is made. By default: ``$TMPDIR`` when that is
    set, else ``/dev/shm`` when it is a RAM file system with at least 1 GiB free, else the
    system's temporary directory. RAM matters: creating a database creates ~300 files, which
    took ~100 ms on a VM's ext4 disk and ~12 ms in ``/dev/shm``.
    """

    def __init__(
        self,
        *,
        bindir: str | os.PathLike[str] | None = None,
        settings: Mapping[str, str] | None = None,
        parent: str | os.PathLike[str] | None = None,
    ) -> None:
        self._bindir_arg = Path(bindir) if bindir is not None else None
        self._parent = Path(parent) if parent is not None else None
        self._settings = {**_SETTINGS, **(settings or {})}
        self._bindir: Path | None = None
        self._tmp: Path | None = None
        self._port: int | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ properties

    @property
    def running(self) -> bool:
        """Whether :meth:`start` succeeded and :meth:`stop` has not been called since."""
        return self._port is not None

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return "127.0.0.1"

    @property
    def port(self) -> int:
        """The TCP port of the running server."""
        if self._port is None:
            msg = "the temporary PostgreSQL server is not running"
            raise RuntimeError(msg)
        return self._port

    @property
    def directory(self) -> Path:
        """The temporary directory (data in ``data/``, server log in ``server.log``, unix socket)."""
        if self._tmp is None:
            msg = "the temporary PostgreSQL server is not running"
            raise RuntimeError(msg)
        return self._tmp

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``isthmus_test`` database (psycopg 3 driver)."""
        return self.url_for(DATABASE)

    @property
    def dsn(self) -> str:
        """libpq connection string of the ``isthmus_test`` database (for ``psycopg.connect``)."""
        return self.dsn_for(DATABASE)

    def url_for(self, database: str) -> str:
        """SQLAlchemy URL of another database of this cluster."""
        return f"postgresql+psycopg://{USER}@{self.host}:{self.port}/{_check_name(database)}"

    def dsn_for(self, database: str) -> str:
        """libpq connection string of another database of this cluster."""
        return f"host={self.host} port={self.port} user={USER} dbname={_check_name(database)}"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> TemporaryPostgres:
        """Create the cluster and start the server; return ``self``. A no-op if running.

        Raises :class:`RuntimeError` if PostgreSQL is not installed, if running as root
        without the ``postgres`` system user, or if ``initdb`` or the server fails (with the
        tail of their output); nothing is left behind then.
        """
        with self._lock:
            if self._port is not None:
                return self
            bindir = self._bindir_arg or find_bindir()
            for tool in ("initdb", "pg_ctl"):
                if not (bindir / tool).is_file():
                    msg = f"{bindir / tool} not found (Debian package {DEBIAN_PACKAGE!r})"
                    raise RuntimeError(msg)
            self._bindir = bindir
            tmp = Path(tempfile.mkdtemp(prefix="isthmus-pg-", dir=self._parent or _default_parent()))
            if len(str(tmp)) > _SOCKET_PATH_MAX - len("/.s.PGSQL.65535"):
                tmp.rmdir()
                tmp = Path(tempfile.mkdtemp(prefix="isthmus-pg-", dir="/tmp"))
            self._tmp = tmp
            try:
                self._initdb()
                self._port = self._start_server()
                self._create(DATABASE, template=None)
            except BaseException:
                self._teardown()
                raise
            return self

    def stop(self) -> None:
        """Stop the server at once (``pg_ctl stop -m immediate``) and delete its directory.

        Idempotent; never raises because the server was already gone.
        """
        with self._lock:
            self._teardown()

    def __enter__(self) -> TemporaryPostgres:
        """Start the server (see :meth:`start`)."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server and delete its directory."""
        self.stop()

    # ------------------------------------------------------------------ databases

    def create_database(self, name: str | None = None, *, template: str | None = None) -> str:
        """Create a database (a copy of ``template`` if given) and return its SQLAlchemy URL.

        ``name`` defaults to a fresh unique name. A template must have no open connection
        while it is copied (close or dispose of whatever migrated it). Copying takes ~20 ms.
        """
        name = _check_name(f"db_{uuid.uuid4().hex[:16]}" if name is None else name)
        with self._lock:
            self._create(name, template=_check_name(template) if template is not None else None)
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, closing any connection still open to it. Missing ones are ignored."""
        from psycopg import sql

        statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(_check_name(name)))
        with self._lock, self._admin() as conn:
            conn.execute(statement)

    # ------------------------------------------------------------------ internals

    def _create(self, name: str, *, template: str | None) -> None:
        from psycopg import sql

        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        with self._admin() as conn:
            if template is not None:
                statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
                if conn.info.server_version >= 150000:
                    # WAL_LOG (the default since 15) copies page by page through the WAL: 3x slower.
                    statement += sql.SQL(" STRATEGY FILE_COPY")
            conn.execute(statement)

    @contextlib.contextmanager
    def _admin(self) -> Iterator[psycopg.Connection[TupleRow]]:
        """An autocommit psycopg connection to the ``postgres`` maintenance database."""
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - psycopg is in the test and postgres extras
            msg = "TemporaryPostgres needs psycopg 3: pip install 'isthmus[postgres]'"
            raise RuntimeError(msg) from exc
        with psycopg.connect(self.dsn_for("postgres"), autocommit=True, connect_timeout=10) as conn:
            yield conn

    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _command(self, tool: str, *args: str) -> list[str]:
        assert self._bindir is not None  # noqa: S101 - set by start() before any command
        command = [str(self._bindir / tool), *args]
        if self._as_root():
            return ["runuser", "-u", _SYSTEM_USER, "--", *command]
        return command

    def _run(self, cwd: Path, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 - fixed executables, arguments built here
            self._command(tool, *args),
            cwd=cwd,  # not the caller's: root's home directory is not readable by the postgres user
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )

    def _initdb(self) -> None:
        tmp = self._tmp
        assert tmp is not None  # noqa: S101 - set by start()
        if self._as_root():
            try:
                shutil.chown(tmp, user=_SYSTEM_USER, group=_SYSTEM_USER)
            except LookupError as exc:
                msg = (
                    "running as root, but there is no 'postgres' system user to run PostgreSQL as"
                    f" (it comes with the Debian package {DEBIAN_PACKAGE!r})"
                )
                raise RuntimeError(msg) from exc
            if shutil.which("runuser") is None:  # pragma: no cover - util-linux is essential on Debian
                msg = "running as root, but 'runuser' (util-linux) is not installed"
                raise RuntimeError(msg)
        data = tmp / "data"
        result = self._run(
            tmp,
            "initdb",
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            USER,
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        if result.returncode != 0:
            msg = f"initdb failed (exit {result.returncode}): {_tail(result.stdout + result.stderr)}"
            raise RuntimeError(msg)

    def _start_server(self) -> int:
        tmp = self._tmp
        assert tmp is not None  # noqa: S101 - set by start()
        conf = tmp / "data" / "postgresql.conf"
        base = conf.read_text(encoding="utf-8")
        log = tmp / "server.log"
        last = ""
        for _ in range(_PORT_ATTEMPTS):
            port = _free_port()
            settings = {
                **self._settings,
                "listen_addresses": "'127.0.0.1'",
                "port": str(port),
                "unix_socket_directories": f"'{tmp}'",
            }
            extra = "".join(f"{key} = {value}\n" for key, value in settings.items())
            conf.write_text(f"{base}\n# isthmus.testing.postgres\n{extra}", encoding="utf-8")
            result = self._run(tmp, "pg_ctl", "start", "-D", str(tmp / "data"), "-l", str(log), "-w", "-t", "30", "-s")
            if result.returncode == 0:
                return port
            last = _tail(result.stdout + result.stderr + _read(log))
            if "already in use" not in last:  # another process took the port in between: retry
                break
        msg = f"the temporary PostgreSQL server did not start: {last}"
        raise RuntimeError(msg)

    def _teardown(self) -> None:
        tmp, self._tmp = self._tmp, None
        self._port = None
        if tmp is None:
            return
        try:
            if (tmp / "data" / "postmaster.pid").exists():
                self._run(tmp, "pg_ctl", "stop", "-D", str(tmp / "data"), "-m", "immediate", "-w", "-s")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"


# ---------------------------------------------------------------------- one cluster per process

_shared_lock = threading.Lock()
_shared: TemporaryPostgres | None = None
_shared_users = 0


@contextlib.contextmanager
def shared_postgres() -> Iterator[TemporaryPostgres]:
    """The process-wide :class:`TemporaryPostgres`, started on first entry.

    Reference-counted: the cluster is stopped when the last ``with shared_postgres()`` block
    exits, so several session-scoped fixtures (one per conftest) share one server and the
    teardown of whichever ends last removes it. Databases created by one user are visible to
    the others: give each test its own (:meth:`TemporaryPostgres.create_database`).
    """
    global _shared, _shared_users  # the whole point: one cluster per process
    with _shared_lock:
        if _shared is None:
            _shared = TemporaryPostgres().start()
        _shared_users += 1
        pg = _shared
    try:
        yield pg
    finally:
        with _shared_lock:
            _shared_users -= 1
            if _shared_users == 0:
                _shared = None
                pg.stop()

"""What one invocation of ``isthmus`` knows: the global options, the configuration, the client.

A :class:`Session` is built by the root callback and stored as ``ctx.obj``; sub-commands get it
with :func:`session`. The configuration file is read lazily, at most once, and only by the
commands that need it (an explicit ``--url`` and ``--token`` make the configuration irrelevant).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import typer

from isthmus.cli.client import ApiClient
from isthmus.cli.errors import CliError

if TYPE_CHECKING:
    from isthmus.config import Config

DEFAULT_TIMEOUT = 10.0
TOKEN_FILE = "admin.token"  # noqa: S105 - a file name, not a secret
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "", "[::]"})  # noqa: S104 - compared, not bound


@dataclass
class Session:
    """The global options of one invocation, and what is derived from them on demand."""

    url_option: str | None
    token_option: str | None
    config_path: Path | None
    env: Mapping[str, str]
    transport: httpx.BaseTransport | None = None
    timeout: float = DEFAULT_TIMEOUT
    _config: Config | None = field(default=None, init=False, repr=False)

    def config(self) -> Config:
        """Load and validate the configuration (``--config`` / ``ISTHMUS_CONFIG`` / defaults)."""
        if self._config is None:
            from isthmus.config import load_config
            from isthmus.errors import ConfigError

            try:
                self._config = load_config(self.config_path, self.env)
            except ConfigError as exc:
                raise CliError(f"invalid configuration: {exc}") from None
        return self._config

    def base_url(self) -> str:
        """The management API's base URL: ``--url``, else derived from ``[http]`` in the config."""
        if self.url_option:
            url = self.url_option.strip().rstrip("/")
            if not url.startswith(("http://", "https://")):
                raise CliError(f"--url must be an http:// or https:// URL, got {self.url_option!r}")
            return url
        http = self.config().http
        if http.port == 0:
            raise CliError("the configuration sets http.port = 0 (a random port): pass --url or set ISTHMUS_URL")
        return f"http://{connect_host(http.host)}:{http.port}"

    def token(self) -> tuple[str, str]:
        """The admin token and a phrase saying where it came from (for error messages)."""
        if self.token_option is not None:
            source = "ISTHMUS_TOKEN" if self.env.get("ISTHMUS_TOKEN") == self.token_option else "--token"
            return _check_token(self.token_option, source), source
        path = (self.config().data_dir / TOKEN_FILE).absolute()  # relative data_dir: relative to the cwd
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CliError(
                f"no admin token: {path} does not exist (the server writes it on first start; "
                "pass --token or set ISTHMUS_TOKEN, or --config to point at the server's configuration)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise CliError(f"cannot read the admin token from {path}: {reason}") from None
        return _check_token(text, str(path)), str(path)

    def client(self) -> ApiClient:
        """An API client for the management API (use it as a context manager)."""
        url = self.base_url()
        token, source = self.token()
        return ApiClient(url, token, token_source=source, transport=self.transport, timeout=self.timeout)


def connect_host(host: str) -> str:
    """The address a local client uses to reach a server listening on ``host``."""
    if host in _WILDCARD_HOSTS:
        return "127.0.0.1"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def _check_token(raw: str, source: str) -> str:
    token = raw.strip()
    if not token:
        raise CliError(f"the admin token from {source} is empty")
    if not token.isascii() or not token.isprintable() or any(ch.isspace() for ch in token):
        raise CliError(f"the admin token from {source} contains characters that cannot be sent in an HTTP header")
    return token


def session(ctx: typer.Context) -> Session:
    """The :class:`Session` the root callback stored in the context."""
    obj = ctx.find_root().obj
    if not isinstance(obj, Session):  # pragma: no cover - the root callback always sets it
        raise CliError("internal error: the command ran without the root callback")
    return obj

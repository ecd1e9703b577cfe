"""A small synchronous client for the management REST API.

Every failure (server down, bad token, an ``{"error": {...}}`` answer, a response that is not
JSON) becomes an :class:`~isthmus.cli.errors.ApiError` whose message is one human sentence,
which the CLI prints as is.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import httpx

from isthmus import __version__
from isthmus.cli.errors import ApiError

Params = Mapping[str, str | int | bool | None]


class ApiClient:
    """Calls ``{base_url}/mgmt/...`` with a Bearer token and decodes the JSON answers."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        token_source: str,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token_source = token_source
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "User-Agent": f"isthmus-cli/{__version__}",
            },
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying connection pool."""
        self._http.close()

    def get(self, path: str, params: Params | None = None) -> Any:
        """``GET path`` and return the decoded JSON body."""
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        """``POST path`` with a JSON body."""
        return self.request("POST", path, body=body)

    def patch(self, path: str, body: Any) -> Any:
        """``PATCH path`` with a JSON body."""
        return self.request("PATCH", path, body=body)

    def put(self, path: str, body: Any) -> Any:
        """``PUT path`` with a JSON body."""
        return self.request("PUT", path, body=body)

    def delete(self, path: str) -> Any:
        """``DELETE path``."""
        return self.request("DELETE", path)

    def request(self, method: str, path: str, *, params: Params | None = None, body: Any = None) -> Any:
        """Send one request; return the decoded JSON (``None`` for an empty body) or raise ApiError."""
        query = {k: _query_value(v) for k, v in (params or {}).items() if v is not None}
        try:
            if body is None:
                response = self._http.request(method, path, params=query)
            else:
                response = self._http.request(method, path, params=query, json=body)
        except httpx.ConnectTimeout:
            raise self._unreachable("timed out") from None
        except httpx.ConnectError as exc:
            raise self._unreachable(_connect_reason(exc)) from None
        except httpx.TimeoutException:
            raise ApiError(f"Isthmus at {self.base_url} did not answer within {self.timeout:g} s") from None
        except httpx.UnsupportedProtocol:
            raise ApiError(f"{self.base_url} is not an http:// or https:// URL") from None
        except httpx.HTTPError as exc:
            raise ApiError(f"lost the connection to Isthmus at {self.base_url}: {_describe(exc)}") from None
        return self._decode(method, path, response)

    def _unreachable(self, reason: str) -> ApiError:
        return ApiError(f"cannot reach Isthmus at {self.base_url} ({reason}) — is 'isthmus serve' running?")

    def _decode(self, method: str, path: str, response: httpx.Response) -> Any:
        status = response.status_code
        if status >= 400:
            raise self._error(method, path, response)
        if status in (204, 205) or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            kind = response.headers.get("content-type", "no content type")
            raise ApiError(
                f"{method} {path} answered HTTP {status} with a body that is not JSON ({kind}) — "
                f"is {self.base_url} an Isthmus server?",
                status=status,
            ) from None

    def _error(self, method: str, path: str, response: httpx.Response) -> ApiError:
        status = response.status_code
        code: str | None = None
        message: str | None = None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            err = body["error"]
            code = err.get("code") if isinstance(err.get("code"), str) else None
            message = err.get("message") if isinstance(err.get("message"), str) else None
        if status == 401:
            why = f": {message}" if message else ""
            return ApiError(
                f"Isthmus rejected the token from {self.token_source} (401 unauthorized{why})",
                status=status,
                code=code,
            )
        if message is None:
            detail = f"HTTP {status} {response.reason_phrase}".rstrip()
            if status == 404:
                return ApiError(
                    f"{method} {path} failed: {detail} — is {self.base_url} an Isthmus server of this version?",
                    status=status,
                )
            return ApiError(f"{method} {path} failed: {detail}", status=status)
        if status >= 500:
            return ApiError(f"server error (HTTP {status}): {message}", status=status, code=code)
        return ApiError(message, status=status, code=code)


def _query_value(value: str | int | bool) -> str | int:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _connect_reason(exc: httpx.ConnectError) -> str:
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return "host name not found"
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    return text or type(exc).__name__


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__

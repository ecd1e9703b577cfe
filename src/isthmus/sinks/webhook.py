"""The webhook sink: POSTs normalised messages as JSON to an HTTP(S) endpoint (httpx).

``format = "batch"`` sends one request per batch whose body is a JSON array of messages;
``format = "single"`` sends one request per message whose body is the message object. Either
way each message carries its ``correlation_id``, which stays the same when a record is
re-delivered or replayed, so receivers can deduplicate: delivery is at-least-once.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Literal

import httpx
from pydantic import Field, field_validator

from isthmus.errors import PermanentSinkError, RetryableSinkError
from isthmus.interfaces import WriteResult
from isthmus.message import Message, Record, encode_message
from isthmus.plugins import PluginConfig, SinkContext, SinkPlugin

__all__ = ["PLUGIN", "WebhookSink", "WebhookSinkConfig"]

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an HTTP header name (RFC 9110 token)
_BODY_EXCERPT = 200  # bytes of an error response quoted in the reason
_READ_CAP = 64 * 1024  # a longer response body is not read to its end (the connection is dropped)


class WebhookSinkConfig(PluginConfig):
    """Options of the ``webhook`` sink."""

    url: str = Field(
        description="Endpoint to POST to: an absolute http:// or https:// URL. Redirects are not followed.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Extra request headers, e.g. {Authorization = 'Bearer …'}. They may override the "
            "defaults Content-Type: application/json and User-Agent: isthmus-webhook."
        ),
    )
    timeout: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description=(
            "Seconds one request may take in all (connecting, sending, waiting for and reading "
            "the response); past it the batch is retried."
        ),
    )
    format: Literal["batch", "single"] = Field(
        default="batch",
        description=(
            "'batch': one POST per batch with a JSON array of messages. 'single': one POST per "
            "message with the message object, sent one after another; a receiver's 4xx then "
            "rejects only that message."
        ),
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as exc:
            raise ValueError(f"invalid URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an absolute http:// or https:// URL")
        return value

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _TOKEN.match(name):
                raise ValueError(f"invalid header name {name!r}")
            if any(c in text for c in "\r\n\0"):
                raise ValueError(f"header {name!r}: value contains a line break or NUL")
        return value


def _redacted(url: httpx.URL) -> str:
    """The URL without credentials or query string (either may hold a secret)."""
    return str(url.copy_with(username=None, password=None, query=None, fragment=None))


class WebhookSink:
    """Implements :class:`~isthmus.interfaces.Sink`: POSTs messages to ``url``.

    Outcome of a request: any 2xx is success. 408, 429, 5xx, connection failures, timeouts and
    broken responses raise :class:`~isthmus.errors.RetryableSinkError` (the runner retries the
    batch). Any other status (other 4xx, and 1xx/3xx since redirects are not followed) is
    permanent: in ``batch`` format it raises :class:`~isthmus.errors.PermanentSinkError`; in
    ``single`` format it rejects that message in the returned
    :class:`~isthmus.interfaces.WriteResult` and the following messages are still sent. A
    retryable failure in ``single`` format raises at once, so messages already accepted are
    sent again on the retry (with the same correlation ids).
    """

    def __init__(self, config: WebhookSinkConfig, ctx: SinkContext) -> None:
        self.config = config
        self.ctx = ctx
        self.url = httpx.URL(config.url)
        self._display_url = _redacted(self.url)
        self._client: httpx.AsyncClient | None = None

    async def open(self) -> None:
        """Create the HTTP client (connection pool). Sends no request."""
        if self._client is not None:
            return
        headers = httpx.Headers({"Content-Type": "application/json", "User-Agent": "isthmus-webhook"})
        headers.update(self.config.headers)
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.config.timeout),
            follow_redirects=False,
        )

    async def close(self) -> None:
        """Close the client and its connections. Safe to call twice."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def write(self, batch: Sequence[Record]) -> WriteResult | None:
        """POST the messages of ``batch`` as configured by ``format`` (see :class:`WebhookSink`)."""
        client = self._client
        if client is None:
            raise RetryableSinkError(f"webhook sink {self.ctx.name!r} is not open")
        rejected: dict[int, str] = {}
        messages: list[tuple[int, Message]] = []
        for index, record in enumerate(batch):
            if record.message is None:
                rejected[index] = "record has no message"
            else:
                messages.append((index, record.message))
        if not messages:
            return WriteResult(rejected=rejected) if rejected else None

        if self.config.format == "batch":
            body = b"[" + b",".join(encode_message(message) for _, message in messages) + b"]"
            failure = await self._post(client, body)
            if failure is not None:
                raise PermanentSinkError(failure)
        else:
            for index, message in messages:
                failure = await self._post(client, encode_message(message))
                if failure is not None:
                    rejected[index] = failure
        return WriteResult(rejected=rejected) if rejected else None

    async def _post(self, client: httpx.AsyncClient, body: bytes) -> str | None:
        """Send one request: ``None`` on success, the reason of a permanent refusal otherwise.

        Raises :class:`~isthmus.errors.RetryableSinkError` for transient failures.
        """
        where = self._display_url
        try:
            async with asyncio.timeout(self.config.timeout):
                async with client.stream("POST", self.url, content=body) as response:
                    status = response.status_code
                    if 200 <= status < 300:
                        await _drain(response)
                        return None
                    excerpt = await _drain(response)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise RetryableSinkError(f"timed out after {self.config.timeout:g} s: POST {where}") from exc
        except httpx.ConnectError as exc:
            raise RetryableSinkError(f"cannot connect ({_cause(exc)}): POST {where}") from exc
        except httpx.RemoteProtocolError as exc:
            raise RetryableSinkError(f"broken response ({_cause(exc)}): POST {where}") from exc
        except httpx.HTTPError as exc:
            raise RetryableSinkError(f"{type(exc).__name__} ({_cause(exc)}): POST {where}") from exc

        reason = f"HTTP {status} {response.reason_phrase}".rstrip() + f" from POST {where}"
        text = excerpt.decode("utf-8", "replace").strip()
        if text:
            reason += f": {text}"
        if status in (408, 429) or status >= 500:
            raise RetryableSinkError(reason)
        return reason


async def _drain(response: httpx.Response) -> bytes:
    """Read the response body (so the connection can be reused); return its first bytes.

    A body longer than ``_READ_CAP`` is abandoned: closing the response then drops the
    connection instead of reading an unbounded body.
    """
    head = b""
    size = 0
    async for chunk in response.aiter_bytes():
        if len(head) < _BODY_EXCERPT:
            head += chunk[: _BODY_EXCERPT - len(head)]
        size += len(chunk)
        if size > _READ_CAP:
            break
    return head


def _cause(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__


def _create(config: WebhookSinkConfig, ctx: SinkContext) -> WebhookSink:
    return WebhookSink(config, ctx)


PLUGIN = SinkPlugin(
    name="webhook",
    description=(
        "POSTs normalised messages as JSON to an HTTP(S) endpoint, a batch per request or one "
        "message per request; 2xx is delivered, 408/429/5xx/network errors are retried."
    ),
    config=WebhookSinkConfig,
    factory=_create,
)

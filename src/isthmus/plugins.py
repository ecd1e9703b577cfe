"""Plugin specifications and the plugin registry.

Built-in sources, decoders and sinks register exactly like third-party ones: through entry
points in the groups ``isthmus.sources``, ``isthmus.decoders`` and ``isthmus.sinks``, each
naming a module-level ``PLUGIN`` spec. A spec carries the plugin's strict configuration model
(pydantic, unknown keys are errors) whose field descriptions generate its documentation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, ValidationError

from isthmus.errors import ConfigError
from isthmus.interfaces import AttributeReader, Decoder, DeviceDirectory, DeviceResolver, Downlink, Sink, Source

WebSocketApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[MutableMapping[str, Any]]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]
"""An ASGI application for ``websocket`` scopes: ``(scope, receive, send)``."""


class PluginConfig(BaseModel):
    """Base of every plugin's configuration model: strict, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


C = TypeVar("C", bound=PluginConfig)


@dataclass(frozen=True, slots=True)
class SinkContext:
    """What a sink may know about where it runs."""

    name: str
    data_dir: Path


@dataclass(frozen=True, slots=True)
class SourceContext:
    """What a source may use: device lookups by token, device resolution by source ids, metrics,
    the way back to devices, their attributes, and WebSocket paths on the HTTP port.

    ``metrics`` is the instance's Prometheus registry: a source registers its own collectors there
    (names prefixed ``isthmus_<source type>_``), never in the global default registry. ``shared``
    is one dictionary for all sources of the instance, where instances of one plugin type keep
    what they share (collectors registered once, keyed by metric name). ``websockets`` maps a path
    of the HTTP listener to the ASGI application serving WebSocket connections there; a source
    adds its own when it is built (one dictionary for the whole instance, like ``shared``).
    """

    name: str
    data_dir: Path
    directory: DeviceDirectory
    resolver: DeviceResolver
    metrics: CollectorRegistry
    downlink: Downlink
    attributes: AttributeReader
    shared: dict[str, Any] = field(default_factory=dict)
    websockets: dict[str, WebSocketApp] = field(default_factory=dict)


class _Named(Protocol):
    @property
    def name(self) -> str: ...


X = TypeVar("X", bound=_Named)
P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class _ConfiguredPlugin(Generic[C, X, P]):
    """A plugin type with options: its name in configuration, its options model and its factory."""

    kind: ClassVar[str] = "plugin"
    name: str
    description: str
    config: type[C]
    factory: Callable[[C, X], P]

    def create(self, options: Mapping[str, Any], ctx: X) -> P:
        """Validate ``options`` and build one instance; raises ConfigError naming the bad key."""
        return self.factory(parse_options(self.config, options, f"{self.kind} {ctx.name!r}"), ctx)


class SinkPlugin(_ConfiguredPlugin[C, SinkContext, Sink]):
    """A sink type (entry point group ``isthmus.sinks``)."""

    __slots__ = ()
    kind = "sink"


class SourcePlugin(_ConfiguredPlugin[C, SourceContext, Source]):
    """A source type (entry point group ``isthmus.sources``)."""

    __slots__ = ()
    kind = "source"


@dataclass(frozen=True, slots=True)
class DecoderPlugin:
    """A decoder: its name (as used by devices and sources) and its factory."""

    name: str
    description: str
    factory: Callable[[], Decoder]


def parse_options(model: type[C], options: Mapping[str, Any], where: str) -> C:
    """Validate plugin options, translating pydantic's errors into one ConfigError."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        raise ConfigError(f"{where}: {format_validation_error(exc)}") from exc


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the key path: ``options.url: Field required``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


class Plugins:
    """The plugins available to one Isthmus instance (no global registry).

    ``Plugins.discover()`` loads every installed entry point; tests may build one by hand.
    """

    def __init__(
        self,
        sinks: Mapping[str, SinkPlugin[Any]],
        decoders: Mapping[str, DecoderPlugin],
        sources: Mapping[str, SourcePlugin[Any]] | None = None,
    ) -> None:
        self.sinks = dict(sinks)
        self.decoders = dict(decoders)
        self.sources = dict(sources or {})

    @classmethod
    def discover(cls) -> Plugins:
        """Load the ``isthmus.sources``, ``isthmus.sinks`` and ``isthmus.decoders`` entry points."""
        return cls(
            _load("isthmus.sinks", SinkPlugin),
            _load("isthmus.decoders", DecoderPlugin),
            _load("isthmus.sources", SourcePlugin),
        )

    def source(self, type_name: str) -> SourcePlugin[Any]:
        """The source plugin called ``type_name``; ConfigError lists the known ones otherwise."""
        try:
            return self.sources[type_name]
        except KeyError:
            known = ", ".join(sorted(self.sources)) or "none"
            raise ConfigError(f"unknown source type {type_name!r} (known: {known})") from None

    def sink(self, type_name: str) -> SinkPlugin[Any]:
        """The sink plugin called ``type_name``; ConfigError lists the known ones otherwise."""
        try:
            return self.sinks[type_name]
        except KeyError:
            known = ", ".join(sorted(self.sinks)) or "none"
            raise ConfigError(f"unknown sink type {type_name!r} (known: {known})") from None

    def decoder(self, name: str) -> DecoderPlugin:
        """The decoder plugin called ``name``; ConfigError lists the known ones otherwise."""
        try:
            return self.decoders[name]
        except KeyError:
            known = ", ".join(sorted(self.decoders)) or "none"
            raise ConfigError(f"unknown decoder {name!r} (known: {known})") from None


def _load(group: str, kind: type[Any]) -> dict[str, Any]:
    specs: dict[str, Any] = {}
    for ep in entry_points(group=group):
        spec = ep.load()
        if not isinstance(spec, kind):
            raise ConfigError(f"entry point {ep.name!r} in {group} is not a {kind.__name__}")
        specs[spec.name] = spec
    return specs

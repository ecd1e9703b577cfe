"""One strict, typed configuration: a TOML file overlaid by ``ISTHMUS_*`` environment variables.

Nothing is read at import time: :func:`load_config` is called once by the CLI and the result is
passed down. Every key is validated; an unknown key is an error that names it, in the file or in
the environment. ``isthmus serve`` with no file at all is the embedded default: SQLite journal,
registry and timeseries store under ``./isthmus-data``, HTTP on port 8080.

Environment variables map onto keys with ``__`` between levels: ``ISTHMUS_HTTP__PORT=8081`` sets
``[http] port``; ``ISTHMUS_DATA_DIR=/var/lib/isthmus`` sets ``data_dir``. Values are parsed as TOML
values when they parse (``8081``, ``true``, ``"x"``, ``[1, 2]``) and taken as strings otherwise.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from isthmus.errors import ConfigError
from isthmus.plugins import format_validation_error

ENV_PREFIX = "ISTHMUS_"
# Variables read by the CLI itself, not configuration keys.
CLI_ENV = frozenset({"ISTHMUS_CONFIG", "ISTHMUS_URL", "ISTHMUS_TOKEN"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HttpConfig(_Strict):
    """The HTTP listener: device API (``/api/v1/{token}/…``), management API, health, metrics."""

    host: str = Field("0.0.0.0", description="Address to listen on.")  # noqa: S104 - devices must reach it
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0 picks a free one).")
    max_payload: int = Field(
        65536, ge=1, le=16 * 1024 * 1024, description="Largest accepted device request body in bytes; larger gets 413."
    )


class RetentionConfig(_Strict):
    """How much journal history to keep."""

    max_age_days: float | None = Field(
        None, gt=0, description="Delete records older than this many days (never past the slowest sink)."
    )
    max_bytes: int | None = Field(
        None, gt=0, description="Keep the journal's live data under this many bytes (oldest deleted first)."
    )
    beyond_cursors: bool = Field(
        False,
        description="Allow retention to delete records a sink has not consumed yet; such drops are counted and logged.",
    )
    interval: float = Field(60.0, gt=0, description="Seconds between retention passes.")


class JournalConfig(_Strict):
    """The embedded SQLite journal (``<data_dir>/journal.db``)."""

    commit_interval: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Extra seconds the writer waits to fill a group commit "
        "(0: commit as soon as the previous one ends).",
    )
    max_batch: int = Field(2000, ge=1, le=100_000, description="Most records in one group commit.")
    synchronous: Literal["full", "normal"] = Field(
        "full",
        description="'full': every commit survives power loss (fsync); 'normal': survives a process crash only.",
    )
    retention: RetentionConfig = Field(default_factory=RetentionConfig)


class TimestampPolicyConfig(_Strict):
    """What to do with message timestamps far from the server clock."""

    max_future: float = Field(3600.0, ge=0, description="Seconds a timestamp may be ahead of the server clock.")
    max_past: float | None = Field(
        None, gt=0, description="Seconds a timestamp may be behind the server clock (unset: no limit)."
    )
    action: Literal["quarantine", "reject", "accept"] = Field(
        "quarantine",
        description="'quarantine': keep the message, do not deliver it, answer 400; 'reject': record a decode error; "
        "'accept': deliver as is.",
    )


KindName = Literal["telemetry", "attributes"]


def _telemetry_only() -> list[KindName]:
    return ["telemetry"]


class SinkConfig(_Strict):
    """One destination, with its own cursor, batching and retry policy."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$", description="Unique name; also the cursor's name.")
    type: str = Field(description="Sink plugin: 'sql', 'webhook', …")
    enabled: bool = Field(True, description="Disabled sinks keep their cursor but do not run.")
    kinds: list[KindName] = Field(default_factory=_telemetry_only, description="Message kinds delivered to this sink.")
    batch_max_records: int = Field(1000, ge=1, le=100_000, description="Most records per write.")
    batch_max_bytes: int = Field(1_048_576, ge=1, description="Stop adding records to a batch past this payload size.")
    batch_period: float = Field(
        0.05,
        ge=0,
        le=60,
        description="Seconds to wait for a fuller batch once the first record is there "
        "(fewer, larger writes at moderate load; 0 writes at once).",
    )
    max_attempts: int = Field(5, ge=1, le=1000, description="Write attempts before a batch is dead-lettered.")
    backoff_initial: float = Field(0.5, gt=0, description="First retry delay in seconds (doubles, with full jitter).")
    backoff_max: float = Field(30.0, gt=0, description="Longest retry delay in seconds.")
    options: dict[str, Any] = Field(default_factory=dict, description="The sink plugin's own options.")


class LogConfig(_Strict):
    """Logging."""

    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Minimum level.")
    format: Literal["auto", "json", "text"] = Field(
        "auto", description="'json' for production, 'text' for a terminal, 'auto' picks by whether stderr is a TTY."
    )


class SourceConfig(_Strict):
    """One extra way devices reach Isthmus (the HTTP device API is always on)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$", description="Unique name; frames carry it as their source.")
    type: str = Field(description="Source plugin: 'mqtt-client', …")
    enabled: bool = Field(True, description="Disabled sources are not started.")
    options: dict[str, Any] = Field(default_factory=dict, description="The source plugin's own options.")


def _default_sinks() -> list[SinkConfig]:
    return [SinkConfig(name="timeseries", type="sql")]


class Config(_Strict):
    """The whole configuration of one Isthmus process."""

    data_dir: Path = Field(Path("isthmus-data"), description="Where the SQLite files and the admin token live.")
    registry_url: str | None = Field(
        None, description="SQLAlchemy URL of the device registry (default: SQLite in data_dir)."
    )
    http: HttpConfig = Field(default_factory=HttpConfig)
    journal: JournalConfig = Field(default_factory=JournalConfig)
    timestamps: TimestampPolicyConfig = Field(default_factory=TimestampPolicyConfig)
    sinks: list[SinkConfig] = Field(default_factory=_default_sinks)
    sources: list[SourceConfig] = Field(default_factory=list)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        for kind, names in (("sink", [s.name for s in self.sinks]), ("source", [s.name for s in self.sources])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind} names must be unique: {', '.join(dupes)}")
        if any(s.name == "http" for s in self.sources):
            raise ValueError("source name 'http' is taken by the built-in HTTP device API")
        return self

    def effective_registry_url(self) -> str:
        """The registry URL, defaulting to ``<data_dir>/registry.db``."""
        return self.registry_url or f"sqlite:///{self.data_dir / 'registry.db'}"


def load_config(path: Path | None, env: Mapping[str, str]) -> Config:
    """Read ``path`` (if given), overlay ``ISTHMUS_*`` variables from ``env``, validate.

    Raises :class:`~isthmus.errors.ConfigError` naming the file, key or variable at fault.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    origins: dict[tuple[str, ...], str] = {}
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in CLI_ENV:
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
        if not all(keys):
            raise ConfigError(f"environment variable {name}: empty key segment")
        _set_path(data, keys, _parse_env_value(raw), name)
        origins[tuple(keys)] = name
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        where = str(path) if path is not None else "configuration"
        message = format_validation_error(exc)
        for err in exc.errors():
            loc = tuple(str(x) for x in err["loc"])
            var = next((v for k, v in origins.items() if loc[: len(k)] == k), None)
            if var is not None:
                message += f" (set by environment variable {var})"
                break
        raise ConfigError(f"{where}: {message}") from None


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set_path(data: dict[str, Any], keys: list[str], value: Any, var: str) -> None:
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"environment variable {var}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def config_reference() -> str:
    """The configuration reference in Markdown, generated from the models (``docs/configuration.md``)."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m isthmus.config > docs/configuration.md`; a test keeps it current. -->",
        "",
        "Isthmus reads one TOML file (`isthmus serve --config FILE`, or `ISTHMUS_CONFIG`) and then",
        "`ISTHMUS_*` environment variables, `__` separating levels (`ISTHMUS_HTTP__PORT=8081`).",
        "Every key is optional; unknown keys are errors that name the key. With no file at all,",
        "Isthmus runs the embedded default: everything under `./isthmus-data`, HTTP on port 8080,",
        "one SQL timeseries sink named `timeseries`.",
        "",
    ]

    def section(title: str, model: type[BaseModel], env_prefix: str, note: str = "") -> None:
        lines.extend([f"## `{title}`", "", (model.__doc__ or "").strip(), ""])
        if note:
            lines.extend([note, ""])
        lines.extend(["| key | type | default | environment | meaning |", "|---|---|---|---|---|"])
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if name in ("sinks", "sources") or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                continue  # sections of their own
            value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
            if field.is_required():
                default = "required"
            else:
                default = "unset" if value is None else repr(str(value) if isinstance(value, Path) else value)
            type_name = str(annotation).replace("typing.", "").replace("pathlib.", "")
            type_name = type_name.replace("<class '", "").replace("'>", "").replace("|", "or")
            env = f"`{env_prefix}{name.upper()}`" if env_prefix else "file only"
            desc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | {type_name} | `{default}` | {env} | {desc} |")
        lines.append("")

    section("(top level)", Config, ENV_PREFIX)
    section("[http]", HttpConfig, f"{ENV_PREFIX}HTTP__")
    section("[journal]", JournalConfig, f"{ENV_PREFIX}JOURNAL__")
    section("[journal.retention]", RetentionConfig, f"{ENV_PREFIX}JOURNAL__RETENTION__")
    section("[timestamps]", TimestampPolicyConfig, f"{ENV_PREFIX}TIMESTAMPS__")
    section("[log]", LogConfig, f"{ENV_PREFIX}LOG__")
    section(
        "[[sinks]]",
        SinkConfig,
        "",
        "A list of tables, one per sink (file only, not the environment). The default is one SQL "
        'timeseries sink: `[[sinks]] name = "timeseries" type = "sql"`. Each sink type\'s own keys go in '
        "its `options` table; see [sinks.md](sinks.md).",
    )
    section(
        "[[sources]]",
        SourceConfig,
        "",
        "A list of tables, one per extra source (file only). None by default: the HTTP device API is "
        "always on. Each source type's own keys go in its `options` table.",
    )
    lines.extend(
        [
            "## Example",
            "",
            "```toml",
            'data_dir = "/var/lib/isthmus"',
            "",
            "[http]",
            "port = 8080",
            "max_payload = 65536",
            "",
            "[journal]",
            'synchronous = "full"',
            "[journal.retention]",
            "max_age_days = 30",
            "",
            "[timestamps]",
            "max_future = 3600",
            'action = "quarantine"',
            "",
            "[[sinks]]",
            'name = "timeseries"',
            'type = "sql"',
            "",
            "[[sinks]]",
            'name = "dashboard"',
            'type = "webhook"',
            "max_attempts = 8",
            "[sinks.options]",
            'url = "https://example.org/ingest"',
            'headers = { Authorization = "Bearer secret" }',
            "```",
            "",
        ]
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference(), end="")

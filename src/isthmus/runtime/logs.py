"""Structured logging: JSON lines in production, readable lines in a terminal.

Log calls pass ``extra={"correlation_id": ...}`` where a frame is involved; both formats print it.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import msgspec

from isthmus.config import LogConfig

# Attributes every LogRecord has, plus uvicorn's ANSI-coloured duplicate of the message.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, any ``extra`` fields, exception."""

    def __init__(self) -> None:
        super().__init__()
        self._encoder = msgspec.json.Encoder()

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value if isinstance(value, str | int | float | bool) or value is None else str(value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return self._encoder.encode(doc).decode()


class TextFormatter(logging.Formatter):
    """``HH:MM:SS level logger: message [correlation_id]`` for terminals."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        corr = getattr(record, "correlation_id", None)
        return f"{line} [{corr}]" if corr else line


def setup_logging(cfg: LogConfig) -> None:
    """Configure the root logger once, at process start (called by ``isthmus serve`` only)."""
    use_json = cfg.format == "json" or (cfg.format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True

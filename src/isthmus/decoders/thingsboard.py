"""ThingsBoard JSON: the telemetry and attribute shapes of the ThingsBoard device API.

Telemetry accepts, at the top level:

* a flat object ``{"temperature": 21.5, "humidity": 60}`` — points without their own timestamp;
* ``{"ts": 1700000000000, "values": {...}}`` — points stamped with ``ts`` (milliseconds);
* an array of either, e.g. ``[{"ts": …, "values": {…}}, {"k": v}]``.

Attributes accept a flat object only. Values may be numbers, booleans, strings or nested JSON
(objects and arrays are kept as they are). ``null`` values, non-finite numbers, empty objects,
empty keys and anything else are rejected with a message naming the problem.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from isthmus.errors import DecodeError, UnsupportedShape
from isthmus.message import Kind, Point
from isthmus.plugins import DecoderPlugin

MAX_KEY_LENGTH = 255
# Milliseconds since the epoch accepted for "ts": 1970 … 9999 (datetime's range).
_MAX_TS_MS = 253_402_300_799_999


class ThingsBoardDecoder:
    """Decodes ThingsBoard JSON telemetry and attribute payloads. Stateless and thread-safe."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = msgspec.json.Decoder()

    def decode(self, payload: bytes, kind: Kind) -> list[Point]:
        """See :class:`isthmus.interfaces.Decoder`."""
        if not payload.strip():
            raise DecodeError("empty body: expected a JSON object")
        try:
            doc = self._decoder.decode(payload)
        except msgspec.DecodeError as exc:
            raise DecodeError(f"malformed JSON: {_describe(exc, payload)}") from None
        except msgspec.ValidationError as exc:  # numbers out of range (1e400)
            raise DecodeError(f"malformed JSON: {exc}") from None
        except UnicodeDecodeError as exc:  # invalid UTF-8 inside a string
            raise DecodeError(f"malformed JSON: not UTF-8 (invalid byte at position {exc.start})") from None
        if kind == "attributes":
            if not isinstance(doc, dict):
                raise UnsupportedShape(f"attributes must be a JSON object, not {_type_name(doc)}")
            return _flat(doc, None, "$")
        if isinstance(doc, dict):
            return _entry(doc, "$")
        if isinstance(doc, list):
            if not doc:
                raise UnsupportedShape("empty array: expected telemetry objects")
            points: list[Point] = []
            for i, item in enumerate(doc):
                if not isinstance(item, dict):
                    raise UnsupportedShape(f"$[{i}] must be an object, not {_type_name(item)}")
                points.extend(_entry(item, f"$[{i}]"))
            return points
        raise UnsupportedShape(f"telemetry must be a JSON object or array, not {_type_name(doc)}")


def _entry(obj: dict[str, Any], where: str) -> list[Point]:
    if "ts" in obj and "values" in obj:
        extra = set(obj) - {"ts", "values"}
        if extra:
            raise UnsupportedShape(f"{where}: unexpected key(s) beside ts/values: {', '.join(sorted(extra))}")
        values = obj["values"]
        if not isinstance(values, dict):
            raise UnsupportedShape(f"{where}.values must be an object, not {_type_name(values)}")
        return _flat(values, _parse_ts(obj["ts"], f"{where}.ts"), f"{where}.values")
    if "values" in obj and isinstance(obj["values"], dict) and len(obj) == 1:
        raise UnsupportedShape(f"{where}: 'values' without 'ts'")
    return _flat(obj, None, where)


def _flat(obj: dict[str, Any], ts: datetime | None, where: str) -> list[Point]:
    if not obj:
        raise UnsupportedShape(f"{where}: empty object, no values")
    points = []
    for key, value in obj.items():
        if not key:
            raise UnsupportedShape(f"{where}: empty key")
        if len(key) > MAX_KEY_LENGTH:
            raise UnsupportedShape(f"{where}: key longer than {MAX_KEY_LENGTH} characters")
        if value is None:
            raise UnsupportedShape(f"{where}.{key}: null is not a value")
        points.append(Point(key, value, ts))
    return points


def _parse_ts(value: Any, where: str) -> datetime:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnsupportedShape(f"{where} must be milliseconds since the epoch, not {_type_name(value)}")
    if not 0 <= value <= _MAX_TS_MS:
        raise UnsupportedShape(f"{where} = {value} is out of range (milliseconds since 1970)")
    return datetime.fromtimestamp(value / 1000, UTC)


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(value), "null")


def _describe(exc: msgspec.DecodeError, payload: bytes) -> str:
    text = str(exc).removeprefix("JSON is malformed: ")
    if "invalid character" in text:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as err:
            return f"not UTF-8 (invalid byte at position {err.start})"
    return text


PLUGIN = DecoderPlugin(
    name="thingsboard",
    description="ThingsBoard JSON telemetry (flat, {ts, values}, arrays) and attributes.",
    factory=ThingsBoardDecoder,
)

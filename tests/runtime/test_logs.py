"""Structured logs: JSON lines carrying the correlation id; readable text for terminals."""

from __future__ import annotations

import logging

import msgspec

from isthmus.runtime.logs import JsonFormatter, TextFormatter


def make_record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("isthmus.test", logging.WARNING, __file__, 1, "journal %s", ("slow",), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_carry_the_correlation_id_and_drop_ansi_duplicates() -> None:
    line = JsonFormatter().format(make_record(correlation_id="019a-abc", color_message="\x1b[36mx\x1b[0m"))
    doc = msgspec.json.decode(line)
    assert doc["message"] == "journal slow"
    assert doc["level"] == "warning"
    assert doc["logger"] == "isthmus.test"
    assert doc["correlation_id"] == "019a-abc"
    assert "color_message" not in doc
    assert doc["time"].endswith("+00:00")


def test_json_lines_include_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = make_record()
        record.exc_info = sys.exc_info()
    doc = msgspec.json.decode(JsonFormatter().format(record))
    assert "ValueError: boom" in doc["exception"]


def test_text_lines_append_the_correlation_id() -> None:
    line = TextFormatter().format(make_record(correlation_id="019a-abc"))
    assert "WARNING" in line and line.endswith("journal slow [019a-abc]")

"""The pydantic models: validation rules and the OpenAPI schema they produce."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from isthmus.registry import models
from isthmus.registry.models import (
    TOKEN_PATTERN,
    Location,
    LogicalDeviceCreate,
    LogicalDevicePatch,
    Mapping,
    PhysicalDevice,
    PhysicalDeviceCreate,
    PhysicalDevicePatch,
)

ALL_MODELS: list[type[BaseModel]] = [
    getattr(models, name) for name in models.__all__ if isinstance(getattr(models, name), type)
]


def _error_locs(exc: ValidationError) -> list[tuple[int | str, ...]]:
    return [tuple(e["loc"]) for e in exc.errors()]


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_every_field_has_a_description(model: type[BaseModel]) -> None:
    missing = [name for name, field in model.model_fields.items() if not field.description]
    assert missing == []
    assert model.__doc__


@pytest.mark.parametrize("model", [PhysicalDeviceCreate, PhysicalDevicePatch, LogicalDeviceCreate, LogicalDevicePatch])
def test_unknown_keys_are_rejected_by_name(model: type[BaseModel]) -> None:
    body: dict[str, Any] = {"name": "x", "colour": "blue"}
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    assert _error_locs(info.value) == [("colour",)]
    assert info.value.errors()[0]["type"] == "extra_forbidden"


def test_create_defaults() -> None:
    create = PhysicalDeviceCreate(name="n")
    assert create.source_name == "http"
    assert create.source_ids == {}
    assert create.properties == {}
    assert create.token is None
    assert create.enabled is True
    assert create.decoder is None


@pytest.mark.parametrize("name", ["", "x" * 201])
def test_name_length_is_bounded(name: str) -> None:
    with pytest.raises(ValidationError):
        PhysicalDeviceCreate(name=name)
    with pytest.raises(ValidationError):
        LogicalDevicePatch(name=name)


@pytest.mark.parametrize("token", ["abc", "A-Z_a.z~09", "x" * 64])
def test_valid_tokens(token: str) -> None:
    assert PhysicalDeviceCreate(name="n", token=token).token == token
    assert PhysicalDevicePatch(token=token).token == token


@pytest.mark.parametrize("token", ["", "x" * 65, "a b", "a/b", "a+b", "a:b", "tök", "a\n"])
def test_invalid_tokens(token: str) -> None:
    with pytest.raises(ValidationError) as info:
        PhysicalDeviceCreate(name="n", token=token)
    assert ("token",) in _error_locs(info.value)
    with pytest.raises(ValidationError) as info:
        PhysicalDevicePatch(token=token)
    assert _error_locs(info.value) == [("token",)]


def test_token_pattern_is_anchored() -> None:
    assert re.fullmatch(TOKEN_PATTERN[1:-1], "abc")
    assert re.match(TOKEN_PATTERN, "abc def") is None


@pytest.mark.parametrize(
    "location", [{"lat": 91, "long": 0}, {"lat": 0, "long": -181}, {"lat": "nan", "long": 0}, {"lat": 1}]
)
def test_location_is_range_checked(location: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PhysicalDeviceCreate.model_validate({"name": "n", "location": location})


def test_location_edges_are_valid() -> None:
    assert Location(lat=-90, long=180) == Location(lat=-90.0, long=180.0)


def test_patch_records_only_present_fields() -> None:
    patch = PhysicalDevicePatch.model_validate({"name": "new", "location": None})
    assert patch.model_fields_set == {"name", "location"}
    assert PhysicalDevicePatch().model_fields_set == set()


@pytest.mark.parametrize("field", ["name", "source_name", "source_ids", "properties", "token", "enabled"])
def test_patch_rejects_null_for_required_fields(field: str) -> None:
    with pytest.raises(ValidationError) as info:
        PhysicalDevicePatch.model_validate({field: None})
    assert _error_locs(info.value) == [(field,)]


@pytest.mark.parametrize("field", ["location", "last_seen", "decoder"])
def test_patch_accepts_null_for_optional_fields(field: str) -> None:
    patch = PhysicalDevicePatch.model_validate({field: None})
    assert patch.model_fields_set == {field}
    assert getattr(patch, field) is None


def test_logical_patch_null_rules() -> None:
    assert LogicalDevicePatch.model_validate({"location": None}).model_fields_set == {"location"}
    for field in ("name", "properties"):
        with pytest.raises(ValidationError):
            LogicalDevicePatch.model_validate({field: None})


def test_input_datetimes_must_be_aware_and_become_utc() -> None:
    with pytest.raises(ValidationError):
        PhysicalDevicePatch.model_validate({"last_seen": "2024-01-01T10:00:00"})
    patch = PhysicalDevicePatch.model_validate({"last_seen": "2024-01-01T10:00:00+10:00"})
    assert patch.last_seen == datetime(2024, 1, 1, 0, 0, tzinfo=UTC)
    assert patch.last_seen is not None and patch.last_seen.tzinfo is UTC


def test_output_datetimes_are_utc_whatever_they_were_given() -> None:
    plus_ten = timezone(timedelta(hours=10))
    mapping = Mapping(
        id=1,
        p_uid=1,
        l_uid=2,
        start_time=datetime(2024, 1, 1, 10, 0, tzinfo=plus_ten),
        end_time=datetime(2024, 1, 2, 0, 0),  # naive: taken as UTC  # noqa: DTZ001
        paused=False,
    )
    assert mapping.start_time == datetime(2024, 1, 1, 0, 0, tzinfo=UTC)
    assert mapping.start_time.tzinfo is UTC
    assert mapping.end_time is not None and mapping.end_time.tzinfo is UTC


def test_source_ids_keep_their_types() -> None:
    create = PhysicalDeviceCreate(name="n", source_ids={"dev_eui": "0011", "port": 3})
    assert create.source_ids == {"dev_eui": "0011", "port": 3}


def test_output_models_are_frozen() -> None:
    device = PhysicalDevice(
        uid=1,
        name="n",
        source_name="http",
        source_ids={},
        location=None,
        last_seen=None,
        properties={},
        token="t",
        enabled=True,
        decoder=None,
        created_at=datetime.now(UTC),
    )
    with pytest.raises(ValidationError):
        device.name = "other"  # type: ignore[misc]


def test_openapi_schema_does_not_offer_null_for_required_patch_fields() -> None:
    schema = PhysicalDevicePatch.model_json_schema()
    assert schema["properties"]["name"]["type"] == "string"
    assert schema["additionalProperties"] is False
    assert "required" not in schema
    assert {"type": "null"} in schema["properties"]["decoder"]["anyOf"]

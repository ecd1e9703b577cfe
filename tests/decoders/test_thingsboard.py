"""Golden cases for the ThingsBoard JSON decoder: ``cases/thingsboard/NAME.in`` is the payload,
``NAME.out.json`` the expected points or ``NAME.err`` a substring of the expected error,
``NAME.kind`` (optional) the kind (default telemetry)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from isthmus.decoders.thingsboard import ThingsBoardDecoder
from isthmus.errors import DecodeError
from isthmus.message import Point

CASES = Path(__file__).parent / "cases" / "thingsboard"
NAMES = sorted(p.stem for p in CASES.glob("*.in"))


def kind_of(name: str) -> str:
    path = CASES / f"{name}.kind"
    return path.read_text().strip() if path.exists() else "telemetry"


@pytest.mark.parametrize("name", NAMES)
def test_golden_case(name: str) -> None:
    payload = (CASES / f"{name}.in").read_bytes()
    decoder = ThingsBoardDecoder()
    expected_err = CASES / f"{name}.err"
    if expected_err.exists():
        with pytest.raises(DecodeError) as info:
            decoder.decode(payload, kind_of(name))  # type: ignore[arg-type]
        assert expected_err.read_text().strip() in str(info.value)
        return
    expected = msgspec.json.decode((CASES / f"{name}.out.json").read_bytes(), type=list[Point])
    assert decoder.decode(payload, kind_of(name)) == expected  # type: ignore[arg-type]


def test_every_case_has_an_expectation() -> None:
    for name in NAMES:
        assert (CASES / f"{name}.out.json").exists() != (CASES / f"{name}.err").exists(), name


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_decode_or_raise_decode_error(data: bytes) -> None:
    decoder = ThingsBoardDecoder()
    for kind in ("telemetry", "attributes"):
        try:
            points = decoder.decode(data, kind)  # type: ignore[arg-type]
        except DecodeError:
            continue
        assert all(isinstance(p, Point) and p.name for p in points)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_arbitrary_json_only_ever_decodes_or_raises_decode_error(doc: object) -> None:
    with contextlib.suppress(DecodeError):
        ThingsBoardDecoder().decode(msgspec.json.encode(doc), "telemetry")

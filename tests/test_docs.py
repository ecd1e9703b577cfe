"""Generated documentation stays current."""

from __future__ import annotations

from pathlib import Path

from isthmus.config import config_reference, load_config

ROOT = Path(__file__).parent.parent


def test_configuration_reference_is_current() -> None:
    checked_in = (ROOT / "docs" / "configuration.md").read_text()
    assert checked_in == config_reference(), "run: python -m isthmus.config > docs/configuration.md"


def test_configuration_example_is_valid(tmp_path: Path) -> None:
    text = config_reference()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "example.toml"
    path.write_text(example)
    cfg = load_config(path, {})
    assert [s.name for s in cfg.sinks] == ["timeseries", "dashboard"]

"""The generated reference, docs/cli.md, is up to date and documents everything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer.main
from typer.core import TyperGroup

from isthmus.cli.docs import render
from isthmus.cli.main import app

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
REGENERATE = "regenerate it: python -m isthmus.cli.docs > docs/cli.md"


def test_checked_in_reference_is_current() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == render(), f"docs/cli.md is stale; {REGENERATE}"


def test_module_entry_point_prints_the_reference() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "isthmus.cli.docs"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "40"},  # no terminal width leaks into the text
    )
    assert result.stdout == render()


def test_every_command_and_option_is_documented() -> None:
    text = render()
    root = typer.main.get_command(app)
    assert isinstance(root, TyperGroup)

    def walk(group: TyperGroup, path: str) -> None:
        for name, command in group.commands.items():
            full = f"{path} {name}"
            assert f"\n## {full}\n" in text.replace("\n### ", "\n## ").replace("\n#### ", "\n## "), full
            assert command.help, f"{full} has no help text"
            for param in command.params:
                if param.param_type_name == "option":
                    assert getattr(param, "help", None), f"{full} {param.opts} has no help text"
            if isinstance(command, TyperGroup):
                walk(command, full)

    walk(root, "isthmus")

"""The README is the user's manual: its configuration table must match the settings."""

from __future__ import annotations

import re
from dataclasses import fields

from backend.settings import Settings, env_name
from harness.server import ROOT


def test_every_setting_is_documented_and_nothing_else() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `((?:TOKENWIRE_)?[A-Z_]+)` \|", readme, re.MULTILINE))
    assert documented == {env_name(f.name) for f in fields(Settings)}


def test_readme_shows_the_two_commands_and_ci_runs_make_test() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "exec make test" in (ROOT / ".ci" / "run").read_text()

"""The README opens with the two commands of a fresh machine, and CI runs the second verbatim."""

from __future__ import annotations

import re

from conftest import REPO


def _fenced_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```sh\n(.+?)\n```", text)


def test_readme_opens_with_setup_and_demo_then_setup_and_tests():
    demo, tests = _fenced_commands()[:2]
    assert demo.startswith("python3 -m venv .venv") and demo.endswith("bbt demo")
    assert tests.startswith("python3 -m venv .venv") and tests.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == _fenced_commands()[1]

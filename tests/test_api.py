"""The scripting surface exported from `bbt`: backends as context managers, run, evaluate, predict,
sweep; and the budget script of the Python API page (docs/python-api.md), run as written."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import bbt
from conftest import SHARED_DATA
from serverproc import REPO

SURFACE = {"local", "remote", "run", "evaluate", "predict", "sweep"}


def test_the_surface_is_exported_and_not_shadowed_by_modules():
    """Importing a submodule binds it on the package: one named like a function of the surface
    (bbt/run.py, bbt/sweep.py) would replace that function once anything imports it."""
    import importlib
    import inspect
    import pkgutil

    assert SURFACE <= set(bbt.__all__)
    for module in pkgutil.walk_packages(bbt.__path__, "bbt."):
        importlib.import_module(module.name)
    for name in SURFACE:
        assert inspect.isfunction(getattr(bbt, name)) and getattr(bbt, name).__doc__, name


def test_run_evaluate_predict_in_a_with_block(tiny_encoder, data_dir, tmp_path):
    with bbt.local() as backend:
        m = bbt.run("sst2", data_dir, out=tmp_path / "r", budget=8, seed=13, backend=backend, model=str(tiny_encoder),
                    prompt_length=4, intrinsic_dim=8, popsize=4)
        assert m["queries_used"] <= 8 and "no_prompt_test_acc" in m
        ev = bbt.evaluate(tmp_path / "r", split="test", backend=backend)
        assert ev["acc"] == pytest.approx(m["test_acc"]) and ev["no_prompt_acc"] == pytest.approx(m["no_prompt_test_acc"])
        rows = bbt.predict(tmp_path / "r", ["a great film", "dull"], backend=backend)
    assert [r["text"] for r in rows] == ["a great film", "dull"] and set(rows[0]["probs"]) == {"negative", "positive"}


def test_sweep_returns_the_table(tiny_encoder, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BBT_CACHE", "off")
    table = bbt.sweep([data_dir.name], data_dir.parent, out=tmp_path / "S", seeds=[13, 42], budgets=[4, 8],
                      model=str(tiny_encoder), prompt_length=4, intrinsic_dim=8, popsize=4, test_limit=None)
    assert [(r["budget"], r["seeds"]) for r in table] == [(4, [13, 42]), (8, [13, 42])]
    assert all({"test", "test_se", "no_prompt", "gap", "gap_se"} <= set(r) for r in table)


BUDGET_SCRIPT_PAGE = REPO / "docs" / "python-api.md"


def _budget_script() -> str:
    """The budget script of the docs' Python API page (it lived in the README before the docs)."""
    text = BUDGET_SCRIPT_PAGE.read_text(encoding="utf-8")
    block = re.search(r"<!-- budget-script -->\s*```python\n(.*?)```", text, re.S)
    assert block, f"the budget script (marked <!-- budget-script -->) is missing from {BUDGET_SCRIPT_PAGE}"
    return block.group(1)


def test_the_budget_script_is_ten_lines():
    assert len(_budget_script().strip().splitlines()) <= 10


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="../shared/data is not here")
def test_the_budget_script_runs_as_written(tmp_path):
    # a fresh folder where ../shared/data is the real one, so the script's runs/ starts empty
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent)
    done = subprocess.run([sys.executable, "-c", _budget_script()], cwd=work, capture_output=True, text=True,
                          timeout=1200, env={**__import__("os").environ, "BBT_CACHE": str(tmp_path / "c.sqlite")})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [x for x in done.stdout.splitlines() if x.strip()]
    assert len(lines) == 2 and all("no prompt" in x for x in lines)

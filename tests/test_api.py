"""The public API of `bbt` and its saved forms.

What `bbt` exports (one sorted list, importable without torch), the scripting surface (backends as
context managers, run, evaluate, predict, sweep; not shadowed by submodules) and the budget script
of the Python API page (docs/python-api.md), run as written; config, task and prompt artifacts
round-trip through JSON, tensors through base64, and requests are validated.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import types
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

import bbt
from bbt.budget import Budget
from bbt.config import TuneConfig
from bbt.errors import ConfigError
from bbt.projection import normal_spec, uniform_spec
from bbt.protocol import EvaluateRequest, Example, ProjectionSpec, TaskSpec, Tensor
from bbt.rundir import ARTIFACT_VERSION, PromptArtifact, load_artifact
from bbt.tasks import BUILTIN_TASKS
from conftest import SHARED_DATA
from serverproc import REPO


def test_import_bbt_loads_no_torch():
    """The client installs numpy, cma, httpx, pydantic: importing it must not pull in the model side."""
    code = ("import sys, bbt, bbt.cli, bbt.tuner, bbt.runs, bbt.rundir, bbt.scoring, bbt.backends, bbt.backends.vllm, bbt.backends.endpoints\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'servers', 'tokenizers'))\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"importing bbt loaded {out.stdout.strip()}"


def test_exported_members():
    """httpx-style: __all__ is sorted, every name in it exists, and every public name is in it."""
    assert bbt.__all__ == sorted(bbt.__all__)
    assert len(set(bbt.__all__)) == len(bbt.__all__)
    for name in bbt.__all__:
        assert hasattr(bbt, name), name
    public = {name for name, value in vars(bbt).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert set(bbt.__all__) == public | {"__version__"}


def test_version_matches_the_package_metadata():
    assert bbt.__version__ == version("bbt")


# ---- save -> load round trips (one table, PEFT-style) --------------------------------------

def _artifact() -> PromptArtifact:
    return PromptArtifact(method="bbtv2", model="minilm", task=BUILTIN_TASKS["mrpc"], prompt_length=5,
                          z=np.random.default_rng(0).standard_normal((2, 7)).tolist(),
                          projections=[normal_spec(seed=1, d=7, D=5 * 384, target_std=0.05),
                                       uniform_spec(seed=2, d=7, D=5 * 384)])


ROUND_TRIPS = {
    "task": TaskSpec(name="topic", labels=["a", "b", "c"], template="{mask} : {text}", verbalizer=["x", "y", "z"],
                     label_texts=["about x", "about y", "about z"]),
    "pair-task": BUILTIN_TASKS["mrpc"],
    "config-default": TuneConfig(),
    "config": TuneConfig(model="/models/tiny", method="bbtv2", seed=7, prompt_length=8, intrinsic_dim=30, popsize=6,
                         sigma=0.3, loss="hinge", projection="uniform", alpha=0.5, bound=5.0, diagonal=True,
                         encoding="float16", k_shot=4,
                         budget=Budget(queries=100, requests=20, examples=800, tokens=10**6, cost=1.5,
                                       price_per_1k_tokens=0.02)),
    "budget-no-query-limit": Budget(queries=None, tokens=10**6),
    "artifact": _artifact(),
    "projection": normal_spec(seed=3, d=4, D=8, target_std=0.7, alpha=0.2, sigma=0.5),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_save_load_round_trip(name, tmp_path):
    obj = ROUND_TRIPS[name]
    path = tmp_path / f"{name}.json"
    path.write_text(obj.model_dump_json(indent=1))
    again = type(obj).model_validate_json(path.read_text())
    assert again == obj
    assert again.model_dump() == obj.model_dump()
    # and through plain json (what config.json holds, written with json.dumps)
    assert type(obj).model_validate(json.loads(json.dumps(obj.model_dump()))) == obj


def test_artifact_round_trip_through_a_run_folder(tmp_path):
    art = _artifact()
    (tmp_path / "prompt.json").write_text(art.model_dump_json(indent=1))
    loaded = load_artifact(tmp_path)
    assert loaded == art
    prompt = loaded.prompt()
    np.testing.assert_array_equal(prompt.z, np.asarray(art.z))
    assert prompt.projections == art.projections and prompt.prompt_length == 5
    cand = prompt.candidates()
    assert cand.z.shape == [1, 2, 7]
    dense = prompt.candidates(encoding="float16")
    assert dense.prompts.shape == [1, 2, 5, 384] and dense.prompts.dtype == "float16"


def test_artifact_from_a_newer_version_loads_with_a_warning(tmp_path):
    data = json.loads(_artifact().model_dump_json())
    data.update(version=ARTIFACT_VERSION + 1, new_field={"from": "the future"})
    (tmp_path / "prompt.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="newer bbt"):
        loaded = load_artifact(tmp_path)
    assert loaded.z == data["z"]
    (tmp_path / "prompt.json").write_text(_artifact().model_dump_json())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current version loads silently
        load_artifact(tmp_path)


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not valid JSON"),
    ('{"version": 1, "method": "bbt"}', "is not a bbt prompt artifact"),
])
def test_bad_artifacts(tmp_path, content, message):
    (tmp_path / "prompt.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_artifact(tmp_path)
    with pytest.raises(ConfigError, match="not a run folder"):
        load_artifact(tmp_path / "elsewhere")


@pytest.mark.parametrize("field,value", [("popsize", 1), ("prompt_length", 0), ("sigma", 0.0), ("method", "bbtv3"),
                                         ("loss", "mse"), ("encoding", "int8"), ("bound", -1.0), ("typo_field", 1)])
def test_tuneconfig_rejects_bad_values_naming_them(field, value):
    with pytest.raises(ValidationError, match=field):
        TuneConfig(**{field: value})


# ---- tensors and requests on the wire ------------------------------------------------------

def test_tensor_round_trips():
    a = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    t = Tensor.from_numpy(a)
    assert t.shape == [2, 3, 4] and t.dtype == "float32"
    np.testing.assert_array_equal(Tensor.model_validate_json(t.model_dump_json()).to_numpy(), a)
    half = Tensor.from_numpy(a, dtype="float16")
    np.testing.assert_allclose(half.to_numpy(), a, rtol=1e-3, atol=1e-3)
    assert half.to_numpy().dtype == np.float32
    assert len(half.data) < len(t.data)
    empty = Tensor.from_numpy(np.zeros((0, 5)))
    assert empty.to_numpy().shape == (0, 5)


def test_tensor_checks_size_and_base64():
    t = Tensor.from_numpy(np.ones((2, 2)))
    with pytest.raises(ValidationError, match=r"holds 24 base64 characters, but shape \[2, 3\] of float32 needs 32 \(24 bytes\)"):
        Tensor(dtype="float32", shape=[2, 3], data=t.data)
    bad = Tensor(dtype="float32", shape=[2, 2], data="!" * len(t.data))
    with pytest.raises(ValueError, match="not valid base64"):
        bad.to_numpy()


@pytest.mark.parametrize("change,message", [
    (dict(labels=[0, 1]), "2 labels for 3 inputs"),
    (dict(labels=[0, 1, 2]), "outside 0..1"),
    (dict(labels=None), "nothing to return"),
    (dict(inputs=[]), "inputs"),
])
def test_evaluate_request_validation(change, message):
    good = dict(model="m", task=BUILTIN_TASKS["sst2"], inputs=[Example(text=t) for t in "abc"], labels=[0, 1, 0])
    with pytest.raises(ValidationError, match=message):
        EvaluateRequest(**{**good, **change})


def test_projection_spec_is_frozen():
    spec = ProjectionSpec(kind="normal", seed=0, d=2, D=4, scale=1.0)
    with pytest.raises(ValidationError):
        spec.seed = 1


# ---- the scripting surface: backends, run, evaluate, predict, sweep ------------------------

SURFACE = {"local", "remote", "resume", "run", "evaluate", "predict", "sweep"}


def test_the_surface_is_exported_and_not_shadowed_by_modules():
    """Importing a submodule binds it on the package: one named like a function of the surface
    (bbt/run.py, bbt/sweep.py) would replace that function once anything imports it."""
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
                          timeout=1200, env={**os.environ, "BBT_CACHE": str(tmp_path / "c.sqlite")})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [x for x in done.stdout.splitlines() if x.strip()]
    assert len(lines) == 2 and all("no prompt" in x for x in lines)


def _imports(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its code (in functions and under
    TYPE_CHECKING too): `from pkg import sub` counts as pkg.sub, `from pkg import name` as pkg."""
    modules = {}
    for f in package.rglob("*.py"):
        parts = f.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    edges = {}
    for name, f in modules.items():
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = {f"{node.module}.{a.name}" for a in node.names}
                found |= (subs & modules.keys()) | ({node.module} if subs - modules.keys() else set())
        edges[name] = (found & modules.keys()) - {name}
    return edges


@pytest.mark.parametrize("package", ["bbt", "servers"])
def test_no_import_cycle_among_a_packages_modules(package):
    edges = _imports(REPO / package)
    done, on_path = set(), []

    def visit(module):  # depth-first: a module met again on the current path closes a cycle
        if module in on_path:
            raise AssertionError("import cycle: " + " -> ".join(on_path[on_path.index(module):] + [module]))
        if module in done:
            return
        on_path.append(module)
        for other in sorted(edges[module]):
            visit(other)
        on_path.pop()
        done.add(module)

    for module in sorted(edges):
        visit(module)


def test_run_with_resume_refuses_other_settings_and_continues_with_the_same(tiny_encoder, data_dir, tmp_path):
    settings = dict(model=str(tiny_encoder), prompt_length=4, intrinsic_dim=8, popsize=4)
    with bbt.local() as backend:
        m = bbt.run("sst2", data_dir, out=tmp_path / "r", budget=8, seed=13, backend=backend, **settings)
        with pytest.raises(ConfigError, match=r"started with seed=13, popsize=4: .*bbt.resume"):
            bbt.run("sst2", data_dir, out=tmp_path / "r", budget=8, seed=14, backend=backend, **{**settings, "popsize": 6},
                    resume=True)
        again = bbt.run("sst2", data_dir, out=tmp_path / "r", budget=8, seed=13, backend=backend, resume=True, **settings)
        assert again == m == bbt.resume(tmp_path / "r", backend=backend)  # finished: its metrics, nothing paid


def test_a_run_through_a_remote_backend_is_resumed_and_scored_on_its_server(tiny_encoder, data_dir, tmp_path,
                                                                             monkeypatch):
    from appserver import serving
    from bbt.backends import local
    from servers.app import create_app
    from servers.service import ModelService

    with serving(create_app(ModelService([str(tiny_encoder)], lazy=False))) as url:
        with bbt.remote(url) as backend:
            m = bbt.run("sst2", data_dir, out=tmp_path / "r", budget=8, seed=13, backend=backend,
                        model=str(tiny_encoder), prompt_length=4, intrinsic_dim=8, popsize=4)
        config = json.loads((tmp_path / "r" / "config.json").read_text())
        assert config["endpoint"] == [url] and config["dtype"] == "float32"
        (tmp_path / "r" / "metrics.json").unlink()  # as if cut short before it wrote them

        def loaded_here(*args, **kwargs):
            raise AssertionError("resumed in process, not through the run's server")

        monkeypatch.setattr(local.LocalBackend, "__init__", loaded_here)
        again = bbt.resume(tmp_path / "r")
        scored = bbt.evaluate(tmp_path / "r")  # no backend: the run's server, as bbt evaluate asks it
        rows = bbt.predict(tmp_path / "r", ["a great film"])
    assert again["test_acc"] == m["test_acc"] and again["queries_used"] == m["queries_used"]
    assert scored["acc"] == pytest.approx(m["test_acc"]) and scored["no_prompt_acc"] == pytest.approx(m["no_prompt_test_acc"])
    assert rows[0]["label"] in ("negative", "positive")


def test_an_ensemble_tuned_through_a_server_is_resumed_there(tiny_encoder, data_dir, tmp_path, monkeypatch):
    """An ensemble folder holds no config.json: where it was tuned is read from its ensemble.json."""
    from appserver import serving
    from bbt.backends import local
    from servers.app import create_app
    from servers.service import ModelService

    out = tmp_path / "e"
    with serving(create_app(ModelService([str(tiny_encoder)], lazy=False))) as url:
        with bbt.remote(url) as backend:
            m = bbt.run("sst2", data_dir, out=out, budget=16, seed=13, backend=backend, ensemble=2,
                        model=str(tiny_encoder), prompt_length=4, intrinsic_dim=8, popsize=4)
        assert json.loads((out / "ensemble.json").read_text())["endpoint"] == [url]
        (out / "metrics.json").unlink()  # cut after its members finished, before the ensemble was scored

        def loaded_here(*args, **kwargs):
            raise AssertionError("resumed in process, not through the ensemble's server")

        monkeypatch.setattr(local.LocalBackend, "__init__", loaded_here)
        again = bbt.resume(out)
    assert again["test_acc"] == m["test_acc"] and again["members"] == 2

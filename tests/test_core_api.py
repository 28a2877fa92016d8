"""The public API (one place, sorted, torch-free) and the saved forms: config, task and prompt
artifacts round-trip through JSON; tensors through base64."""

from __future__ import annotations

import json
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
from pydantic import ValidationError

import bbt
from bbt.budget import Budget
from bbt.config import TuneConfig
from bbt.errors import ConfigError
from bbt.projection import normal_spec, uniform_spec
from bbt.protocol import EvaluateRequest, Example, ProjectionSpec, TaskSpec, Tensor
from bbt.runs import ARTIFACT_VERSION, PromptArtifact, load_artifact
from bbt.tasks import BUILTIN_TASKS


def test_import_bbt_loads_no_torch():
    """The client installs numpy, cma, httpx, pydantic: importing it must not pull in the model side."""
    code = ("import sys, bbt, bbt.cli, bbt.tuner, bbt.runs, bbt.backends, bbt.backends.vllm, bbt.backends.endpoints\n"
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
    from importlib.metadata import version

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


# ---- tensors and requests on the wire -------------------------------------------------------

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

"""The random projection A: its statistics, and that a spec rebuilds exactly the same matrix."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from bbt.projection import build_matrix, cached_matrix, normal_spec, project, uniform_spec
from bbt.protocol import ProjectionSpec


def test_uniform_spec_is_pytorch_linear_init():
    spec = uniform_spec(seed=3, d=50, D=4000)
    assert spec.kind == "uniform"
    assert spec.scale == pytest.approx(1 / math.sqrt(50))
    a = build_matrix(spec)
    assert a.shape == (4000, 50) and a.dtype == np.float32
    assert a.min() >= -spec.scale and a.max() <= spec.scale
    # U(-s, s): mean 0, std s / sqrt(3); 200k draws put both well inside these bands
    assert abs(a.mean()) < 0.01 * spec.scale
    assert a.std() == pytest.approx(spec.scale / math.sqrt(3), rel=0.01)
    # and it fills the interval rather than clustering
    assert a.min() < -0.99 * spec.scale and a.max() > 0.99 * spec.scale


def test_normal_matrix_has_the_spec_std():
    spec = ProjectionSpec(kind="normal", seed=5, d=40, D=5000, scale=0.25)
    a = build_matrix(spec)
    assert a.shape == (5000, 40) and a.dtype == np.float32
    assert abs(a.mean()) < 0.01 * 0.25
    assert a.std() == pytest.approx(0.25, rel=0.01)


@pytest.mark.parametrize("alpha,sigma,target", [(1.0, 1.0, 0.05), (0.5, 0.2, 1.3), (2.0, 3.0, 0.4)])
def test_normal_spec_puts_first_prompts_at_alpha_times_target_std(alpha, sigma, target):
    """With z ~ N(0, sigma^2 I) (CMA-ES's first population), every entry of A z has std alpha * target."""
    d = 100
    spec = normal_spec(seed=11, d=d, D=3000, target_std=target, alpha=alpha, sigma=sigma)
    assert spec.scale == pytest.approx(alpha * target / (math.sqrt(d) * sigma))
    z = np.random.default_rng(0).standard_normal((64, d)) * sigma
    p = project(z, spec)
    assert p.shape == (64, 3000)
    assert p.std() == pytest.approx(alpha * target, rel=0.03)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_normal_spec_rejects_a_bad_target_std(bad):
    with pytest.raises(ValueError, match="target_std"):
        normal_spec(seed=0, d=10, D=20, target_std=bad)


@pytest.mark.parametrize("kind", ["uniform", "normal"])
def test_spec_rebuilds_the_same_matrix_after_a_json_round_trip(kind):
    spec = ProjectionSpec(kind=kind, seed=1234, d=30, D=640, scale=0.1)
    again = ProjectionSpec.model_validate_json(spec.model_dump_json())
    assert again == spec and hash(again) == hash(spec)
    np.testing.assert_array_equal(build_matrix(spec), build_matrix(again))


def test_every_field_of_the_spec_changes_the_matrix():
    base = ProjectionSpec(kind="normal", seed=7, d=20, D=300, scale=0.1)
    a = build_matrix(base)
    assert not np.array_equal(a, build_matrix(base.model_copy(update={"seed": 8})))
    assert not np.array_equal(a, build_matrix(base.model_copy(update={"kind": "uniform"})))
    np.testing.assert_allclose(build_matrix(base.model_copy(update={"scale": 0.2})), 2 * a, rtol=1e-6)
    assert build_matrix(base.model_copy(update={"d": 21})).shape == (300, 21)
    assert build_matrix(base.model_copy(update={"D": 301})).shape == (301, 20)


def test_matrix_follows_the_documented_recipe():
    """What another implementation must do to rebuild A: numpy's PCG64 seeded with `seed`, float32 draws
    in C order (D, d); uniform: U[0, 1) mapped to [-scale, scale); normal: standard normal times scale."""
    for kind in ("uniform", "normal"):
        spec = ProjectionSpec(kind=kind, seed=2024, d=9, D=70, scale=0.3)
        rng = np.random.default_rng(2024)  # default_rng(seed) is Generator(PCG64(seed))
        if kind == "uniform":
            expected = rng.random((70, 9), dtype=np.float32) * np.float32(0.6) - np.float32(0.3)
        else:
            expected = rng.standard_normal((70, 9), dtype=np.float32) * np.float32(0.3)
        np.testing.assert_array_equal(build_matrix(spec), expected)


_REBUILD = """
import hashlib, sys
from bbt.projection import build_matrix
from bbt.protocol import ProjectionSpec
spec = ProjectionSpec.model_validate_json(sys.argv[1])
print(hashlib.sha256(build_matrix(spec).tobytes()).hexdigest())
"""


def test_another_process_rebuilds_the_same_bytes():
    """What a server does with a spec it receives: a fresh interpreter gets bit-identical A."""
    spec = ProjectionSpec(kind="normal", seed=99, d=25, D=500, scale=0.03)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", _REBUILD, spec.model_dump_json()], capture_output=True, text=True,
                         env=env, timeout=60, check=True)
    assert out.stdout.strip() == hashlib.sha256(build_matrix(spec).tobytes()).hexdigest()


def test_project_is_A_z_plus_p0():
    spec = uniform_spec(seed=2, d=8, D=24)
    rng = np.random.default_rng(1)
    z = rng.standard_normal((5, 8))
    p0 = rng.standard_normal(24).astype(np.float32)
    a = build_matrix(spec).astype(np.float64)
    np.testing.assert_allclose(project(z, spec), z @ a.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(project(z, spec, p0), z @ a.T + p0, rtol=1e-5, atol=1e-6)
    assert project(z, spec).dtype == np.float32
    # z = 0 gives exactly the offset
    np.testing.assert_array_equal(project(np.zeros((2, 8)), spec, p0), np.stack([p0, p0]))


@pytest.mark.parametrize("shape", [(8,), (3, 7), (2, 3, 8)])
def test_project_rejects_z_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match="expected"):
        project(np.zeros(shape), uniform_spec(seed=0, d=8, D=16))


def test_cached_matrix_is_shared_and_read_only():
    spec = normal_spec(seed=4, d=6, D=12, target_std=1.0)
    m = cached_matrix(spec)
    assert cached_matrix(ProjectionSpec(**spec.model_dump())) is m
    np.testing.assert_array_equal(m, build_matrix(spec))
    with pytest.raises(ValueError):
        m[0, 0] = 1.0


@pytest.mark.parametrize("field,value", [("scale", 0.0), ("scale", -0.1), ("scale", float("inf")), ("seed", -1),
                                         ("d", 0), ("D", 0), ("kind", "cauchy")])
def test_projection_spec_rejects_bad_values(field, value):
    good = dict(kind="normal", seed=0, d=4, D=8, scale=0.1)
    with pytest.raises(ValidationError, match=field):
        ProjectionSpec(**{**good, field: value})


def test_a_batch_of_one_z_is_kept_and_not_projected_again():
    """BBTv2 sends every layer's best z with each request (one layer changes per generation): a z
    that is the whole batch is kept, so more layers than `cached_matrix` holds rebuild no matrix,
    and the kept rows have the bits of a fresh one-row product."""
    rng = np.random.default_rng(0)
    specs = [normal_spec(seed=100 + i, d=16, D=24, target_std=1.0) for i in range(12)]  # > cached_matrix's 8
    z = rng.normal(size=(1, 16)).astype(np.float32)
    first = [project(np.repeat(z, 3, axis=0), s) for s in specs]
    built = cached_matrix.cache_info().misses
    again = [project(np.repeat(z, 5, axis=0), s) for s in specs]
    assert cached_matrix.cache_info().misses == built
    for a, b, s in zip(first, again, specs):
        fresh = z @ build_matrix(s).T
        np.testing.assert_array_equal(a, np.repeat(fresh, 3, axis=0))
        np.testing.assert_array_equal(b, np.repeat(fresh, 5, axis=0))
    b[0, 0] += 1.0  # what a caller gets is its own
    np.testing.assert_array_equal(project(z, specs[-1]), z @ build_matrix(specs[-1]).T)

"""Checkpoints: each CMA-ES in a part file of its own, rewritten only when its state changed."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from bbt import checkpoint
from bbt.errors import ConfigError
from bbt.optimizer import CMAES


def _step(es: CMAES, seed: int) -> None:
    x = es.ask()
    es.tell(x, np.random.default_rng(seed).random(len(x)))


def _state(n: int = 3) -> dict:
    return {"optimizers": [CMAES(16, popsize=6, seed=i) for i in range(n)], "generation": 0}


def test_a_generation_rewrites_only_the_optimizer_it_moved(tmp_path):
    path, state = tmp_path / "state.pkl", _state()
    checkpoint.save(path, state)
    parts = checkpoint.parts_dir(path)
    first = {p.name: p.stat().st_mtime_ns for p in parts.iterdir()}
    assert len(first) == 3

    _step(state["optimizers"][1], 0)  # BBTv2: one layer's CMA-ES per generation
    state["generation"] = 1
    checkpoint.save(path, state)
    second = {p.name: p.stat().st_mtime_ns for p in parts.iterdir()}
    assert len(second) == 3  # the part it replaced is gone
    assert set(first) - set(second) == {n for n in first if n.startswith("1-")}
    assert all(second[n] == first[n] for n in second if not n.startswith("1-"))  # untouched files

    loaded = checkpoint.load(path)
    assert loaded["generation"] == 1
    for mine, theirs in zip(state["optimizers"], loaded["optimizers"]):
        assert np.array_equal(mine.ask(), theirs.ask())  # the same state, sampler included


def test_an_ask_without_a_tell_changes_the_part(tmp_path):
    """A cut final generation asks and never tells: its sampler has moved, so its part must be rewritten."""
    path, state = tmp_path / "state.pkl", _state(1)
    checkpoint.save(path, state)
    before = {p.name for p in checkpoint.parts_dir(path).iterdir()}
    state["optimizers"][0].ask()
    checkpoint.save(path, state)
    after = {p.name for p in checkpoint.parts_dir(path).iterdir()}
    assert before != after
    assert np.array_equal(checkpoint.load(path)["optimizers"][0].ask(), state["optimizers"][0].ask())


def test_a_checkpoint_of_the_first_format_still_loads(tmp_path):
    path, state = tmp_path / "state.pkl", _state(2)
    path.write_bytes(pickle.dumps({"format": 1, "state": state}))
    loaded = checkpoint.load(path)
    assert np.array_equal(loaded["optimizers"][1].ask(), state["optimizers"][1].ask())


def test_a_missing_part_is_a_clear_error_and_remove_clears_all(tmp_path):
    path = tmp_path / "state.pkl"
    checkpoint.save(path, _state(2))
    next(checkpoint.parts_dir(path).iterdir()).unlink()
    with pytest.raises(ConfigError, match="cannot read the checkpoint"):
        checkpoint.load(path)
    checkpoint.remove(path)
    assert not path.exists() and not checkpoint.parts_dir(path).exists()
    assert checkpoint.load(path) is None
